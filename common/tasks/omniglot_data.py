"""Omniglot on disk: find the official archives or trees, decode once, cache as one uint8 array.

Accepts `images_background*.zip` / `images_evaluation*.zip` (or the same trees extracted, or
`alphabet/character/*.png` directly) under a data directory. Images are 28x28 grayscale,
strokes 255 on 0. Decoded images are cached as `.npy` + a JSON index in
`data_dir/.fedmeta-cache/`, or, when that is not writable, in `$XDG_CACHE_HOME/fedmeta/` keyed by
the resolved data directory; a cache whose source fingerprint (names, sizes, mtimes) differs is
rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

IMAGE_SIZE = 28
CACHE_VERSION = 1
# Caps on local input, checked before anything is read or decoded. An official drawing is a
# 105 x 105 1-bit PNG of ~300 bytes and images_background.zip holds ~19k of them (~10 MB).
MAX_DRAWING_BYTES = 1 << 20  # per PNG (its uncompressed size in the archive)
MAX_SOURCE_BYTES = 512 << 20  # all PNGs of one archive or tree together
MAX_ENTRIES = 200_000  # names in one archive
MAX_DRAWING_SIDE = 1024  # pixels a side, read from the PNG header before decoding
_NO_DATA = ("expected images_background*.zip / images_evaluation.zip or extracted alphabet/character/drawing.png "
            "trees; the official archives are published at https://github.com/brendenlake/omniglot "
            "(python/images_background.zip, python/images_evaluation.zip); fedmeta-client --download fetches them")


@dataclass(frozen=True)
class OmniglotData:
    """Every decoded drawing: images uint8 [drawings, 28, 28] (255 = stroke), grouped by class.

    Class i is `alphabets[i]/characters[i]` from split `splits[i]` ("background" or
    "evaluation"); its drawings are rows offsets[i] : offsets[i] + counts[i], in file-name order.
    """

    images: np.ndarray
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    splits: tuple[str, ...]
    counts: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def names(self) -> list[str]:
        return [f"{a}/{c}" for a, c in zip(self.alphabets, self.characters)]


# ---------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class _Source:
    path: Path
    split: str  # "background" | "evaluation"


def _find_sources(root: Path) -> list[_Source]:
    """Official archives or their extracted trees (an archive wins over a tree of the same name), else root itself."""
    found: dict[str, _Source] = {}
    for split in ("background", "evaluation"):
        for p in sorted(root.glob(f"images_{split}*")):
            stem = p.name[:-4] if p.suffix == ".zip" else p.name
            if (p.suffix == ".zip" and p.is_file()) or (p.is_dir() and stem not in found):
                found[stem] = _Source(p, split)
    if found:
        return sorted(found.values(), key=lambda s: (s.split != "background", s.path.name))
    if any(_pngs_below(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        return [_Source(root, "background")]
    raise ValueError(f"--data-dir {root}: no Omniglot data found: {_NO_DATA}")


def _pngs_below(alphabet: Path) -> bool:
    return any(c.is_dir() and any(c.glob("*.png")) for c in alphabet.iterdir())


def _fingerprint(root: Path, sources: list[_Source]) -> str:
    """sha256 over (relative name, size, mtime) of every source file, plus the cache format."""
    entries: list[tuple[str, str, int, int]] = []
    for src in sources:
        if src.path.is_file():
            files = [str(src.path)]
        else:  # os.walk: several times faster than Path.rglob over Omniglot's 32k files
            files = []
            for folder, subdirs, names in os.walk(src.path):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                files.extend(os.path.join(folder, n) for n in names)
        for f in sorted(files):
            st = os.stat(f)
            entries.append((src.split, os.path.relpath(f, root), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps([CACHE_VERSION, IMAGE_SIZE, entries]).encode()).hexdigest()


def _decode_png(data: bytes, name: str) -> np.ndarray:
    """One drawing as uint8 [28, 28], inverted so strokes are 255 (the PNGs are black on white)."""
    from PIL import Image, UnidentifiedImageError

    from fedmeta.common.images import ImageRefused, open_bounded

    try:
        with open_bounded(io.BytesIO(data), name, max_side=MAX_DRAWING_SIDE,
                          max_pixels=MAX_DRAWING_SIDE * MAX_DRAWING_SIDE) as img:
            small = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except ImageRefused as exc:
        raise ValueError(f"{exc}; the official drawings are 105 x 105: replace the archive") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name}: cannot decode this Omniglot image ({exc}); re-extract or replace the archive") from exc
    return 255 - np.asarray(small, dtype=np.uint8)


def _walk(src: _Source) -> Iterator[tuple[str, str, str | None, bytes | None]]:
    """(where, alphabet, character, png bytes) per drawing; character None / png None mark empty folders."""
    if src.path.is_file():
        try:
            with zipfile.ZipFile(src.path) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_ENTRIES:
                    raise ValueError(f"{src.path}: {len(infos):,} entries is refused: an Omniglot archive has at most "
                                     f"{MAX_ENTRIES:,}; replace the archive")
                names = [i.filename for i in infos if "__MACOSX" not in i.filename]
                pngs = [n for n in names if n.endswith(".png") and n.count("/") >= 2]
                png_names = set(pngs)
                _check_sizes(src.path, [(f"{src.path}:{i.filename}", i.file_size) for i in infos
                                        if i.filename in png_names])
                prefixes = {tuple(n.split("/")[:-3]) for n in pngs}
                for n in names:  # folder entries reveal empty alphabets / characters
                    parts = tuple(n.rstrip("/").split("/"))
                    if n.endswith("/") and parts[:-1] in prefixes:
                        yield f"{src.path}:{n}", parts[-1], None, None
                    elif n.endswith("/") and parts[:-2] in prefixes and len(parts) >= 2:
                        yield f"{src.path}:{n}", parts[-2], parts[-1], None
                for n in sorted(pngs):
                    *_, alphabet, character, _file = n.split("/")
                    yield f"{src.path}:{n}", alphabet, character, zf.read(n)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{src.path}: not a readable zip archive ({exc}); download it again") from exc
        return
    alph_dirs = sorted(d for d in src.path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(alph_dirs) == 1 and not _pngs_below(alph_dirs[0]):  # images_background/images_background/...
        alph_dirs = sorted(d for d in alph_dirs[0].iterdir() if d.is_dir() and not d.name.startswith("."))
    total = 0
    for a in alph_dirs:
        yield str(a), a.name, None, None
        for c in sorted(d for d in a.iterdir() if d.is_dir()):
            yield str(c), a.name, c.name, None
            for f in sorted(c.glob("*.png")):
                total = _check_sizes(src.path, [(str(f), f.stat().st_size)], total)
                yield str(f), a.name, c.name, f.read_bytes()


def _check_sizes(source: Path, entries: list[tuple[str, int]], total: int = 0) -> int:
    """Refuse a drawing over MAX_DRAWING_BYTES, or a source whose drawings pass MAX_SOURCE_BYTES; the new total."""
    for where, size in entries:
        if size > MAX_DRAWING_BYTES:
            raise ValueError(f"{where}: {size:,} bytes is refused as an Omniglot drawing: at most "
                             f"{MAX_DRAWING_BYTES:,} (the official ones are ~300 bytes); replace the archive")
        total += size
        if total > MAX_SOURCE_BYTES:
            raise ValueError(f"{source}: its drawings pass {MAX_SOURCE_BYTES:,} bytes uncompressed at {where}; "
                             "an Omniglot archive holds ~10 MB: replace the archive")
    return total


def _decode_all(sources: list[_Source]) -> OmniglotData:
    drawings: dict[tuple[str, str], list[np.ndarray]] = {}
    split_of: dict[tuple[str, str], str] = {}
    alphabet_at: dict[str, str] = {}
    for src in sources:
        claimed = set(split_of)  # classes a previous source already gave (small1 and small2 overlap)
        for where, alphabet, character, png in _walk(src):
            alphabet_at.setdefault(alphabet, where)
            if character is None or (alphabet, character) in claimed:
                continue
            split_of.setdefault((alphabet, character), src.split)
            images = drawings.setdefault((alphabet, character), [])
            if png is not None:
                images.append(_decode_png(png, where))
    have_chars = {a for a, _ in drawings}
    for alphabet, where in alphabet_at.items():
        if alphabet not in have_chars:
            raise ValueError(f"alphabet {alphabet!r} ({where}) has no characters: remove the folder or restore its data")
    if not drawings:
        raise ValueError(f"{', '.join(str(s.path) for s in sources)}: no Omniglot drawings found: {_NO_DATA}")
    keys = sorted(drawings, key=lambda k: (split_of[k] != "background", k))
    for a, c in keys:
        if len(drawings[(a, c)]) < 2:
            raise ValueError(f"character {a}/{c} has {len(drawings[(a, c)])} drawing(s): expected at least 2 "
                             "(Omniglot has 20); remove the folder or restore its drawings")
    return OmniglotData(
        images=np.stack([im for k in keys for im in drawings[k]]).astype(np.uint8),
        alphabets=tuple(a for a, _ in keys), characters=tuple(c for _, c in keys),
        splits=tuple(split_of[k] for k in keys), counts=np.array([len(drawings[k]) for k in keys], dtype=np.int64))


def cache_dirs(data_dir: Path) -> list[Path]:
    """Where the decoded cache may live: next to the data, else under $XDG_CACHE_HOME/fedmeta."""
    root = data_dir.resolve()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return [root / ".fedmeta-cache", xdg / "fedmeta" / f"omniglot-{key}"]


def _read_cache(cache: Path, fingerprint: str) -> OmniglotData | None:
    try:
        index = json.loads((cache / "omniglot.json").read_text())
        if index.get("fingerprint") != fingerprint:
            return None
        images = np.load(cache / index["images"], mmap_mode="r", allow_pickle=False)
        counts = np.array(index["counts"], dtype=np.int64)
        if images.dtype != np.uint8 or images.shape != (int(counts.sum()), IMAGE_SIZE, IMAGE_SIZE):
            return None
        return OmniglotData(images, tuple(index["alphabets"]), tuple(index["characters"]), tuple(index["splits"]),
                            counts)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, partial or foreign: rebuild


def _marked_writable(path: Path) -> bool:
    """Writable and not marked read-only: root passes os.access anywhere, but a folder without w bits means keep out."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(cache: Path, data: OmniglotData, fingerprint: str) -> None:
    """Images first, then the index naming them: a reader never sees an index without its images."""
    nearest = next(p for p in (cache, *cache.parents) if p.exists())
    if not _marked_writable(nearest):
        raise PermissionError(f"{nearest} is read-only")
    cache.mkdir(parents=True, exist_ok=True)
    images_name = f"images-{fingerprint[:16]}.npy"
    _write_atomic(cache / images_name, lambda f: np.save(f, data.images, allow_pickle=False))
    index = {"version": CACHE_VERSION, "fingerprint": fingerprint, "images": images_name,
             "alphabets": data.alphabets, "characters": data.characters, "splits": data.splits,
             "counts": data.counts.tolist()}
    _write_atomic(cache / "omniglot.json", lambda f: f.write(json.dumps(index).encode()))
    for old in cache.glob("images-*.npy"):
        if old.name != images_name:
            old.unlink(missing_ok=True)


def load_omniglot(data_dir: Path) -> OmniglotData:
    """All classes under `data_dir`, decoded once and then read from the cache (memory-mapped)."""
    if not data_dir.exists():
        raise ValueError(f"--data-dir {data_dir}: no such directory; point it at the folder holding the Omniglot data")
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir}: not a directory; point it at the folder holding the Omniglot data")
    sources = _find_sources(data_dir)
    fingerprint = _fingerprint(data_dir, sources)
    for cache in cache_dirs(data_dir):
        if (data := _read_cache(cache, fingerprint)) is not None:
            return data
    data = _decode_all(sources)
    errors = []
    for cache in cache_dirs(data_dir):
        try:
            _write_cache(cache, data, fingerprint)
            return data
        except OSError as exc:  # read-only data, or a file where the cache folder should be
            errors.append(f"{cache}: {exc}")
    warnings.warn(f"Omniglot cache not written ({'; '.join(errors)}); every load will decode the images", stacklevel=2)
    return data
