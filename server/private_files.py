"""Credential files that are private from their first byte: keys and tokens, never chmod-ed afterwards."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600


def write_file(path: Path, data: bytes, *, mode: int = PRIVATE) -> None:
    """Write `data` to `path` through a new file created with `mode`, then renamed over `path`.

    The temporary file is created with O_CREAT | O_EXCL and `mode` (less whatever the umask
    removes), so no moment exists at which the data sits in a file others may read, even
    when `path` already exists with a wider mode; the rename replaces it whole.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_private(path: Path, text: str) -> None:
    """Append `text` to `path`, creating it with mode 0600 when it is new (an existing file keeps its mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), PRIVATE)
    with os.fdopen(fd, "a") as f:
        f.write(text)
