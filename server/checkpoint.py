"""Atomic checkpoints: one safetensors file (tensors) with a JSON metadata entry.

Written to a temporary file, fsynced, then renamed over the previous one, so a
coordinator killed at any moment leaves either the old or the new checkpoint.

Test-only hook: FEDMETA_TEST_CHECKPOINT_PAUSE_S=SECONDS makes save() sleep that long
after the temporary file is written and fsynced and before the rename, whenever a
previous checkpoint exists, so an integration test can kill the coordinator while the
temporary file is on disk (tests/integration/test_failures.py). Never set it in a run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FILENAME = "state.safetensors"
_META_KEY = "fedmeta"
_TEST_PAUSE_ENV = "FEDMETA_TEST_CHECKPOINT_PAUSE_S"


@dataclass(frozen=True)
class Checkpoint:
    """theta (flat), outer-optimizer tensors and JSON-friendly metadata."""

    theta: torch.Tensor
    outer: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = directory / f".{FILENAME}.tmp"
    tensors = {"theta": checkpoint.theta.contiguous()}
    tensors.update({f"outer.{k}": v.contiguous() for k, v in checkpoint.outer.items()})
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(checkpoint.meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _test_pause(path)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _test_pause(path: Path) -> None:
    """Test-only: sleep before replacing an existing checkpoint if FEDMETA_TEST_CHECKPOINT_PAUSE_S is set."""
    pause = os.environ.get(_TEST_PAUSE_ENV)
    if pause and path.exists():
        time.sleep(float(pause))


def load(directory: Path) -> Checkpoint | None:
    """The checkpoint in directory, or None if there is none."""
    path = directory / FILENAME
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        theta = tensors["theta"]
    except Exception as exc:  # safetensors raises its own error types across versions
        raise ValueError(f"checkpoint {path} is unreadable ({exc!r}); move it away to start afresh") from exc
    outer = {k.removeprefix("outer."): v for k, v in tensors.items() if k.startswith("outer.")}
    return Checkpoint(theta=theta, outer=outer, meta=meta)
