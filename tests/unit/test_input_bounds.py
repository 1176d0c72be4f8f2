"""Local inputs are bounded: Omniglot archives and trees, and fedmeta-adapt's images, are refused with a
one-line error naming the file before an oversized entry is read or a huge image is decoded."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmeta.common import images
from fedmeta.common.images import ImageRefused, load_image, load_image_folder
from fedmeta.common.tasks import omniglot_data
from fedmeta.common.tasks.omniglot_data import load_omniglot
from tests.omniglot_fixtures import fake_drawing, write_fake_omniglot

ENTRY = "images_background/Alpha/character01/0001_01.png"


@pytest.fixture(autouse=True)
def _private_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _png(width: int, height: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 1).save(buf, format="PNG")
    return buf.getvalue()


def _archive(root: Path, first: bytes) -> Path:
    """A two-drawing Omniglot archive whose first drawing is `first`."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "images_background.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(ENTRY, first)
        zf.writestr(ENTRY.replace("_01.png", "_02.png"), fake_drawing(rng, 30))
    return path


def _one_line(exc: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_an_archive_entry_over_the_cap_is_refused_before_it_is_read(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _archive(tmp_path / "big", bytes(omniglot_data.MAX_DRAWING_BYTES + 1))  # deflates to ~1 KB
    assert path.stat().st_size < 10_000
    read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: pytest.fail(f"read {name}")
                        if name == ENTRY else read(self, name, pwd))
    with pytest.raises(ValueError) as exc:
        load_omniglot(tmp_path / "big")
    message = _one_line(exc)
    assert message.startswith(f"{path}:{ENTRY}: 1,048,577 bytes is refused as an Omniglot drawing")


def test_an_archive_whose_drawings_pass_the_total_cap_is_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3, size=30)
    monkeypatch.setattr(omniglot_data, "MAX_SOURCE_BYTES", 1_000)  # 12 drawings of ~145 bytes
    with pytest.raises(ValueError) as exc:
        load_omniglot(tmp_path)
    message = _one_line(exc)
    assert message.startswith(f"{tmp_path / 'images_background.zip'}: its drawings pass 1,000 bytes uncompressed at ")


def test_an_extracted_drawing_over_the_cap_is_refused(tmp_path: Path) -> None:
    tree = write_fake_omniglot(tmp_path, alphabets={"Alpha": 1}, drawings=2, as_zip=False)
    big = tree / "Alpha" / "character01" / "0001_01.png"
    big.write_bytes(bytes(omniglot_data.MAX_DRAWING_BYTES + 1))
    with pytest.raises(ValueError) as exc:
        load_omniglot(tmp_path)
    assert _one_line(exc).startswith(f"{big}: 1,048,577 bytes is refused as an Omniglot drawing")


def test_a_drawing_with_huge_pixel_dimensions_is_refused_before_decoding(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png(5_000, 5_000)  # 25 M pixels in a ~10 KB 1-bit PNG: a decompression bomb
    assert len(data) < omniglot_data.MAX_DRAWING_BYTES
    path = _archive(tmp_path / "bomb", data)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded the bomb"))
    with pytest.raises(ValueError) as exc:
        load_omniglot(tmp_path / "bomb")
    message = _one_line(exc)
    assert message.startswith(f"{path}:{ENTRY}: image of 5000 x 5000 pixels is refused")


def test_too_many_archive_entries_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _archive(tmp_path / "many", _png(30, 30))
    monkeypatch.setattr(omniglot_data, "MAX_ENTRIES", 1)
    with pytest.raises(ValueError) as exc:
        load_omniglot(tmp_path / "many")
    assert _one_line(exc).startswith(f"{path}: 2 entries is refused")


# ---- fedmeta-adapt's images (common/images.py) ---------------------------------------------------------


def test_image_files_and_dimensions_over_the_caps_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wide = tmp_path / "wide.png"
    wide.write_bytes(_png(images.MAX_IMAGE_SIDE + 1, 8))
    with pytest.raises(ImageRefused, match=rf"^{wide}: image of 10001 x 8 pixels is refused"):
        load_image(wide, 28)
    many = tmp_path / "many.png"
    many.write_bytes(_png(8000, 8000))  # each side under the cap, 64 M pixels over it
    with pytest.raises(ImageRefused, match="image of 8000 x 8000 pixels is refused"):
        load_image(many, 28)
    big = tmp_path / "big.png"
    big.write_bytes(_png(10, 10) + bytes(images.MAX_IMAGE_BYTES))
    with pytest.raises(ImageRefused, match=rf"^{big}: a file of [0-9,]+ bytes is refused as an image: at most 33,554,432"):
        load_image(big, 28)
    with pytest.raises(ValueError, match="image size: expected an integer from 1 to 1024"):
        load_image(wide, 1 << 20)
    folder = tmp_path / "support"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "ok.png").write_bytes(_png(20, 20))
    (folder / "a" / "wide.png").write_bytes(wide.read_bytes())
    with pytest.raises(ValueError, match="wide.png: image of 10001 x 8 pixels is refused"):
        load_image_folder(folder, 28)


@pytest.mark.parametrize("side", [15, 20], ids=["pillow-warning", "pillow-error"])
def test_pillows_decompression_bomb_checks_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               side: int) -> None:
    """Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that: both refuse here."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side))
    with pytest.raises(ImageRefused) as exc:
        load_image(path, 28)
    message = _one_line(exc)
    assert message.startswith(f"{path}: refused as a possible decompression bomb")


def test_ordinary_images_still_load(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(_png(3000, 2000, "L"))
    assert load_image(path, 28).shape == (28, 28)
