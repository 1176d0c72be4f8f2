"""--download against a real HTTP server on 127.0.0.1 serving generated archives.

The generated archives are not the official ones, so each test pins their sizes and digests
in place of the official pins (monkeypatch of omniglot_download.PINNED, in this process only).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedmeta.common.tasks.omniglot import load_omniglot
from fedmeta.common.tasks import omniglot_download
from fedmeta.common.tasks.omniglot_download import ARCHIVES, PINNED, Pin, download
from tests.omniglot_fixtures import write_fake_omniglot


class _QuietServer(ThreadingHTTPServer):
    """Says nothing when a download stops reading early (a longer-than-pinned archive is cut off)."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def _pin(path: Path) -> Pin:
    data = path.read_bytes()
    return Pin(len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "site"
    root.mkdir()
    write_fake_omniglot(root, alphabets={"A": 2, "B": 2}, drawings=3, size=30, name="images_background")
    write_fake_omniglot(root, alphabets={"C": 2}, drawings=3, size=30, name="images_evaluation")
    for name in ARCHIVES:
        monkeypatch.setitem(omniglot_download.PINNED, name, _pin(root / name))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_fetches_both_archives_once(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    data = tmp_path / "data"
    paths = download(data, base_url=url)
    assert [p.name for p in paths] == list(ARCHIVES)
    assert all(p.read_bytes() == (root / p.name).read_bytes() for p in paths)
    loaded = load_omniglot(data)
    assert sorted(set(loaded.alphabets)) == ["A", "B", "C"]
    (root / ARCHIVES[0]).unlink()  # a second call finds the archives and fetches nothing
    assert download(data, base_url=url) == paths


def test_download_failures_are_one_line_errors_and_leave_nothing(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    with pytest.raises(ValueError, match=r"--download: cannot fetch .*images_background.zip"):
        download(tmp_path / "a", base_url=url + "missing/")
    (root / ARCHIVES[0]).write_bytes(b"<html>not a zip</html>")
    with pytest.raises(ValueError, match="sent 22 bytes .*not the official archive.*refused and deleted"):
        download(tmp_path / "b", base_url=url)
    assert list((tmp_path / "b").iterdir()) == []


@pytest.mark.parametrize("tamper", ["one-byte-flipped", "longer", "shorter"])
def test_an_archive_that_is_not_the_pinned_one_is_refused_and_deleted(
        served: tuple[str, Path], tmp_path: Path, tamper: str) -> None:
    url, root = served
    archive = root / ARCHIVES[1]
    data = bytearray(archive.read_bytes())
    if tamper == "one-byte-flipped":  # same size, still a readable zip: only the digest tells
        data[len(data) // 2] ^= 0xFF
    elif tamper == "longer":
        data += bytes(4 << 20)  # the download stops one byte past the pinned size
    else:
        data = data[:-1]
    archive.write_bytes(bytes(data))
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError) as err:
        download(data_dir, base_url=url)
    message = str(err.value)
    assert "\n" not in message and ARCHIVES[1] in message and "refused and deleted" in message
    assert ("more than" in message) == (tamper == "longer")
    assert sorted(p.name for p in data_dir.iterdir()) == [ARCHIVES[0]]  # the good one stays, nothing else


def test_the_official_pins() -> None:
    """Sizes and SHA-256 of brendenlake/omniglot python/*.zip (as TensorFlow Datasets pins them)."""
    assert PINNED == {
        "images_background.zip": Pin(9464212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
        "images_evaluation.zip": Pin(6462886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
    }
