"""--download against a real HTTP server on 127.0.0.1 serving generated archives."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.tasks.omniglot import load_omniglot
from common.tasks.omniglot_download import ARCHIVES, download
from tests.omniglot_fixtures import write_fake_omniglot


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "site"
    root.mkdir()
    write_fake_omniglot(root, alphabets={"A": 2, "B": 2}, drawings=3, size=30, name="images_background")
    write_fake_omniglot(root, alphabets={"C": 2}, drawings=3, size=30, name="images_evaluation")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
    with pytest.raises(ValueError, match="did not return a zip archive"):
        download(tmp_path / "b", base_url=url)
    assert list((tmp_path / "b").iterdir()) == []
