"""Atomic, verified checkpoints: safetensors files (tensors) with a JSON metadata entry.

The newest checkpoint is `state.safetensors`; the ones before it are kept as
`state.1.safetensors`, `state.2.safetensors`, ... (`keep` files in all). A save writes a
temporary file, fsyncs it, shifts the older files down by one and renames the temporary
file into place, so a coordinator killed at any moment leaves the previous checkpoints
intact. `load` trusts nothing because it sits in the run directory: a file that does not
parse, whose θ or optimiser state is not finite, or whose θ does not hash to the stored
parameter version is skipped with a log line, and the previous one is tried.

Test-only hook: FEDMETA_TEST_CHECKPOINT_PAUSE_S=SECONDS makes save() sleep that long
after the temporary file is written and fsynced and before the rename, whenever a
previous checkpoint exists, so an integration test can kill the coordinator while the
temporary file is on disk (tests/integration/test_failures.py). Never set it in a run.

Test-only hook: FEDMETA_TEST_CHECKPOINT_ENOSPC_AT_ROUND=N makes save() fail with ENOSPC for
the checkpoint whose next round is N, as a full disk would, where the test cannot mount a
small tmpfs (tests/integration/test_shutdown.py, without root). Never set it in a run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger("fedmeta.checkpoint")

FILENAME = "state.safetensors"
DEFAULT_KEEP = 2
_META_KEY = "fedmeta"
_TEST_PAUSE_ENV = "FEDMETA_TEST_CHECKPOINT_PAUSE_S"
_TEST_ENOSPC_ENV = "FEDMETA_TEST_CHECKPOINT_ENOSPC_AT_ROUND"


@dataclass(frozen=True)
class Checkpoint:
    """theta (flat), outer-optimizer tensors and JSON-friendly metadata."""

    theta: torch.Tensor
    outer: dict[str, torch.Tensor]
    meta: dict[str, Any]


def path_of(directory: Path, age: int) -> Path:
    """The checkpoint `age` saves old: 0 is the newest (state.safetensors), 1 the one before, ..."""
    return directory / (FILENAME if age == 0 else f"state.{age}.safetensors")


def _age(path: Path) -> int | None:
    if path.name == FILENAME:
        return 0
    m = re.fullmatch(r"state\.([1-9][0-9]{0,5})\.safetensors", path.name)
    return int(m.group(1)) if m else None


def candidates(directory: Path) -> list[Path]:
    """Every checkpoint file in directory, newest first (however many an earlier `keep` left)."""
    if not directory.is_dir():
        return []
    aged = [(age, p) for p in directory.iterdir() if (age := _age(p)) is not None]
    return [p for _, p in sorted(aged)]


def save(directory: Path, checkpoint: Checkpoint, *, keep: int = DEFAULT_KEEP) -> Path:
    """Write checkpoint as the newest; keep the `keep - 1` before it; delete older ones."""
    if keep < 1:
        raise ValueError(f"keep: expected at least 1 checkpoint, got {keep}")
    directory.mkdir(parents=True, exist_ok=True)
    path = path_of(directory, 0)
    tmp = directory / f".{FILENAME}.tmp"
    tensors = {"theta": checkpoint.theta.contiguous()}
    tensors.update({f"outer.{k}": v.contiguous() for k, v in checkpoint.outer.items()})
    try:
        fail_at = os.environ.get(_TEST_ENOSPC_ENV)
        if fail_at and checkpoint.meta.get("next_round") == int(fail_at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(checkpoint.meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves the previous checkpoint and no partial file
        if isinstance(exc, Exception) and not isinstance(exc, OSError):  # safetensors' own error type
            raise OSError(f"cannot write checkpoint {tmp}: {exc}") from exc
        raise
    _test_pause(path)
    # Shift older files down (oldest first); a crash in between leaves a gap that load() skips.
    # The newest is hard-linked, not moved, to state.1 so that state.safetensors never
    # disappears: the final rename replaces it atomically.
    for age in range(keep - 1, 1, -1):
        older = path_of(directory, age - 1)
        if older.exists():
            os.replace(older, path_of(directory, age))
    if keep > 1 and path.exists():
        _link_or_copy(path, path_of(directory, 1))
    os.replace(tmp, path)
    for stale in candidates(directory):  # fewer kept than before: drop the surplus
        if (_age(stale) or 0) >= keep:
            stale.unlink()
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link where the file system has them, else a copy, then a rename."""
    staging = dst.with_name(f".{dst.name}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(src, staging)
    except OSError:
        shutil.copyfile(src, staging)
    os.replace(staging, dst)


def _test_pause(path: Path) -> None:
    """Test-only: sleep before replacing an existing checkpoint if FEDMETA_TEST_CHECKPOINT_PAUSE_S is set."""
    pause = os.environ.get(_TEST_PAUSE_ENV)
    if pause and path.exists():
        time.sleep(float(pause))


def read(path: Path) -> Checkpoint:
    """One checkpoint file, parsed; ValueError naming the file if it is unreadable."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        theta = tensors["theta"]
        if not isinstance(meta, dict):
            raise TypeError(f"metadata is a {type(meta).__name__}, not an object")
    except Exception as exc:  # safetensors raises its own error types across versions
        raise ValueError(f"checkpoint {path} is unreadable ({exc!r}); move it away to start afresh") from exc
    outer = {k.removeprefix("outer."): v for k, v in tensors.items() if k.startswith("outer.")}
    return Checkpoint(theta=theta, outer=outer, meta=meta)


def verify(path: Path, ckpt: Checkpoint, version_of: Callable[[torch.Tensor], str] | None) -> None:
    """ValueError unless θ and the optimiser state are finite and θ hashes to the stored version."""
    if not ckpt.theta.is_floating_point() or not bool(torch.isfinite(ckpt.theta).all()):
        raise ValueError(f"checkpoint {path}: θ holds non-finite values")
    for name, tensor in ckpt.outer.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint {path}: optimiser state {name!r} holds non-finite values")
    if version_of is not None:
        stored = ckpt.meta.get("version")
        actual = version_of(ckpt.theta)
        if stored != actual:
            raise ValueError(f"checkpoint {path}: θ hashes to version {actual[:12]!r}, the checkpoint says "
                             f"{str(stored)[:12]!r}")


def load(directory: Path, *, version_of: Callable[[torch.Tensor], str] | None = None) -> Checkpoint | None:
    """The newest checkpoint in directory that parses and verifies, or None if there is none.

    version_of(theta) computes the parameter version (SHA-256 of θ) to check against the
    stored one. A bad file is skipped with a warning naming it and why; if every file is
    bad the newest file's error is raised, since starting afresh would lose the run.
    """
    found = candidates(directory)
    first_error: ValueError | None = None
    for path in found:
        try:
            ckpt = read(path)
            verify(path, ckpt, version_of)
        except ValueError as exc:
            first_error = first_error or exc
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        if path != found[0]:
            log.warning("resuming from the older checkpoint %s", path)
        return ckpt
    if first_error is not None:
        raise first_error
    return None
