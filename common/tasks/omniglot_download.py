"""`fedmeta-client --download`: fetch the official Omniglot archives, only when asked.

Nothing in fedmeta downloads at run time otherwise. The archives are those the data set's
authors publish (Lake et al. 2015, MIT licence) in github.com/brendenlake/omniglot.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger("fedmeta.client")

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVES = ("images_background.zip", "images_evaluation.zip")


def download(data_dir: Path, *, base_url: str = OFFICIAL_URL, timeout_s: float = 120.0) -> list[Path]:
    """Fetch each archive missing from data_dir (written to a temp file, checked, renamed); return the paths."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ARCHIVES:
        path = data_dir / name
        paths.append(path)
        if path.is_file() and zipfile.is_zipfile(path):
            continue
        url = base_url + name
        tmp = data_dir / f".{name}.part"
        log.info("downloading %s to %s", url, path)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            if not zipfile.is_zipfile(tmp):
                raise ValueError(f"--download: {url} did not return a zip archive")
            os.replace(tmp, path)
        except (urllib.error.URLError, OSError) as exc:
            raise ValueError(f"--download: cannot fetch {url} ({getattr(exc, 'reason', exc)}); download "
                             f"{', '.join(ARCHIVES)} yourself into {data_dir}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return paths
