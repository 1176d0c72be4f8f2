"""Image loading for few-shot classification: one file, or a folder of class sub-folders.

The project's image convention is Omniglot's as the models are trained on it (see
common/tasks/omniglot.py): grayscale, square, foreground bright. Drawings are stored as
black strokes on white paper, so a loaded image is inverted: a black stroke becomes 255
(1.0 once scaled) and the white background 0. Give images in that form (dark ink on a
light background); an image that is already light-on-dark comes out inverted.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Caps on what one input image may cost before it is decoded: a photo from a phone passes,
# a crafted file (a small PNG declaring 100k x 100k pixels, a huge file) does not.
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_SIDE = 10_000
MAX_IMAGE_PIXELS = 50_000_000
MAX_SIZE = 1024  # the largest size an image is resized to (conv4's image_size cap)


class ImageRefused(ValueError):
    """An image over a cap, or a decompression bomb: refused before it is decoded."""


@contextlib.contextmanager
def open_bounded(source: str | Path | IO[bytes], where: str, *, max_side: int = MAX_IMAGE_SIDE,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[PILImage.Image]:
    """Image.open, with the pixel dimensions the header declares checked before anything is decoded.

    Pillow's own decompression-bomb guard (Image.MAX_IMAGE_PIXELS) is an error here, never a
    warning; either refusal is a one-line ValueError naming `where`.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as img:
                width, height = img.size
                if width > max_side or height > max_side or width * height > max_pixels:
                    raise ImageRefused(f"{where}: image of {width} x {height} pixels is refused: at most {max_side} "
                                     f"pixels a side and {max_pixels:,} in all")
                yield img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRefused(f"{where}: refused as a possible decompression bomb ({exc})") from None


def load_image(path: Path | str, size: int, *, invert: bool = True) -> np.ndarray:
    """One image as uint8 [size, size]: grayscale, resized (Lanczos), inverted so strokes are 255.

    Transparent pixels count as white paper; JPEG orientation tags are applied.
    Raises ValueError naming the file when Pillow cannot read it, or when the file or its
    pixel dimensions are over MAX_IMAGE_BYTES / MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS (checked
    before decoding).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not (isinstance(size, int) and 1 <= size <= MAX_SIZE):
        raise ValueError(f"image size: expected an integer from 1 to {MAX_SIZE}, got {size!r}")
    try:
        nbytes = os.stat(path).st_size
    except OSError as exc:
        raise ValueError(f"{path}: cannot read this image ({exc})") from exc
    if nbytes > MAX_IMAGE_BYTES:
        raise ImageRefused(f"{path}: a file of {nbytes:,} bytes is refused as an image: at most {MAX_IMAGE_BYTES:,}")
    try:
        with open_bounded(path, str(path)) as opened:
            img: Image.Image = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(paper, rgba)
            small = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            pixels = np.asarray(small, dtype=np.uint8)
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read this image ({exc})") from exc
    return 255 - pixels if invert else pixels.copy()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The images directly in `folder` (by suffix, case-insensitive), sorted by name; hidden files skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted by name: one class each."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


@dataclass(frozen=True)
class ImageSet:
    """Images of one folder: pixels float32 [N, 1, size, size] in [0, 1] and where each came from.

    `labels` are int64 [N] indices into `classes` (sorted class folder names), or None
    for a flat folder of images with no classes. `names` are paths relative to the folder.
    """

    pixels: np.ndarray
    names: tuple[str, ...]
    labels: np.ndarray | None
    classes: tuple[str, ...]


def _stack(paths: list[Path], size: int) -> np.ndarray:
    images = np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size), np.uint8)
    return (images.astype(np.float32) / 255.0)[:, None]


def load_image_folder(folder: Path, size: int, *, classes: tuple[str, ...] | None = None) -> ImageSet:
    """A folder of class sub-folders of images (labelled), or a flat folder of images (unlabelled).

    With `classes` given (a support set's), sub-folder names must be among them and keep
    their indices; otherwise the sorted sub-folder names are the classes 0..N-1.
    A folder that holds both images and class sub-folders is refused.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: expected a folder of images or of class sub-folders, got no such folder")
    subdirs, loose = class_folders(folder), list_images(folder)
    if subdirs and loose:
        raise ValueError(f"{folder}: expected either class sub-folders or images, got both "
                         f"({len(subdirs)} sub-folders and e.g. {loose[0].name})")
    if not subdirs:
        return ImageSet(_stack(loose, size), tuple(p.name for p in loose), None, ())
    names = tuple(d.name for d in subdirs)
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{folder}: class folders {unknown} are not classes of the support set {list(classes)}")
    paths: list[Path] = []
    labels: list[int] = []
    for d in subdirs:
        found = list_images(d)
        if not found:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"{d}: expected images ({suffixes}) in this class folder, got none")
        paths += found
        labels += [classes.index(d.name)] * len(found)
    return ImageSet(_stack(paths, size), tuple(str(p.relative_to(folder)) for p in paths),
                    np.asarray(labels, dtype=np.int64), classes)
