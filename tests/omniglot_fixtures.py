"""Small fake Omniglot data sets in the official layout, for tests: never the real data.

`write_fake_omniglot` draws random stroke-like glyphs (black polylines on white, 1-bit PNG,
like the real drawings) as `<name>/<alphabet>/characterNN/<id>_<NN>.png`, either as a zip
archive (with folder entries, like the official ones) or as an extracted tree.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_ZIP_DATE = (2015, 12, 11, 0, 0, 0)  # fixed, so the same arguments give byte-identical archives


def fake_drawing(rng: np.random.Generator, size: int = 105) -> bytes:
    """One PNG: 1-3 random polylines of width ~size/20, black strokes on white, mode "1"."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        points = [tuple(float(v) for v in rng.uniform(0.15 * size, 0.85 * size, 2)) for _ in range(int(rng.integers(2, 6)))]
        draw.line(points, fill=0, width=max(2, size // 20))
    buf = io.BytesIO()
    img.convert("1").save(buf, format="PNG")
    return buf.getvalue()


def write_fake_omniglot(
    root: Path,
    *,
    alphabets: Mapping[str, int],
    drawings: int = 6,
    size: int = 105,
    as_zip: bool = True,
    name: str | None = "images_background",
    seed: int = 0,
    drawings_of: Mapping[str, int] | None = None,
) -> Path:
    """Write `alphabets` ({alphabet: number of characters}, 0 for an empty alphabet folder) under `root`.

    Every character has `drawings` drawings unless `drawings_of` names it ("Alpha/character01": n).
    With `as_zip`, writes `root/<name>.zip` holding `<name>/...`; else the tree `root/<name>/...`,
    or `root/<alphabet>/...` directly when `name` is None. Returns the archive or tree path.
    """
    if as_zip and name is None:
        raise ValueError("write_fake_omniglot: an archive needs a name")
    files: dict[str, bytes | None] = {}  # relative path -> PNG bytes, None for a folder
    prefix = f"{name}/" if name else ""
    if prefix:
        files[prefix] = None
    for a_index, (alphabet, characters) in enumerate(alphabets.items()):
        files[f"{prefix}{alphabet}/"] = None
        for c in range(1, characters + 1):
            character = f"character{c:02d}"
            files[f"{prefix}{alphabet}/{character}/"] = None
            count = (drawings_of or {}).get(f"{alphabet}/{character}", drawings)
            rng = np.random.default_rng([seed, zlib.crc32(f"{alphabet}/{character}".encode())])
            for d in range(1, count + 1):
                files[f"{prefix}{alphabet}/{character}/{100 * a_index + c:04d}_{d:02d}.png"] = fake_drawing(rng, size)
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = root / f"{name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel, data in files.items():
                zf.writestr(zipfile.ZipInfo(rel, _ZIP_DATE), data if data is not None else b"")
        return path
    for rel, data in files.items():
        target = root / rel
        if data is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(data)
    return root / name if name else root
