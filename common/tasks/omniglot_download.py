"""`fedmeta-client --download`: fetch the official Omniglot archives, only when asked, and check them.

Nothing in fedmeta downloads at run time otherwise. The archives are those the data set's
authors publish (Lake et al. 2015, MIT licence) in github.com/brendenlake/omniglot. Each is
checked against its pinned size and SHA-256 (PINNED) while it streams in: a longer stream is
cut at the pinned size, and a mismatch is deleted and refused, so what lands in --data-dir
is byte for byte the official archive or nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedmeta.client")

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


@dataclass(frozen=True)
class Pin:
    """What an official archive is: its size in bytes and its SHA-256 (hex)."""

    size: int
    sha256: str


# The official archives' sizes and SHA-256 digests, as TensorFlow Datasets pins them
# (tensorflow_datasets/url_checksums/omniglot.txt); TFDS's pins for the two small background
# archives match the copies in this project's test data byte for byte. torchvision pins the
# same two files by MD5: 68d2efa1b9178cc56df9314c21c6e718 and 6b91aef0f799c5bb55b94e3f2daec811.
# Tests replace entries of this table in-process (monkeypatch) to serve archives they generate.
PINNED: dict[str, Pin] = {
    "images_background.zip": Pin(9_464_212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "images_evaluation.zip": Pin(6_462_886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
}
ARCHIVES = tuple(PINNED)


def download(data_dir: Path, *, base_url: str = OFFICIAL_URL, timeout_s: float = 120.0) -> list[Path]:
    """Fetch each archive missing from data_dir (to a temp file, checked against PINNED, renamed); return the paths."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ARCHIVES:
        pin = PINNED[name]
        path = data_dir / name
        paths.append(path)
        if path.is_file() and zipfile.is_zipfile(path):
            continue
        url = base_url + name
        tmp = data_dir / f".{name}.part"
        log.info("downloading %s to %s", url, path)
        try:
            digest, size = hashlib.sha256(), 0
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                # Never more than one byte past the pinned size: enough to tell "too long" apart.
                while size <= pin.size and (chunk := response.read(min(1 << 20, pin.size + 1 - size))):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if size != pin.size or digest.hexdigest() != pin.sha256:
                got = f"{size} bytes" if size <= pin.size else f"more than {pin.size} bytes"
                raise ValueError(f"--download: {url} sent {got} with SHA-256 {digest.hexdigest()[:16]}..., not the "
                                 f"official archive ({pin.size} bytes, SHA-256 {pin.sha256[:16]}...); refused and "
                                 f"deleted: download {name} yourself into {data_dir}")
            os.replace(tmp, path)
        except (urllib.error.URLError, OSError) as exc:
            raise ValueError(f"--download: cannot fetch {url} ({getattr(exc, 'reason', exc)}); download "
                             f"{', '.join(ARCHIVES)} yourself into {data_dir}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return paths
