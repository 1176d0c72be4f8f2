"""fedmeta-adapt's inputs: the exported model's description and the examples, from image folders or CSV.

Everything here is read from files a data holder gives: each reader refuses what it cannot
use with a one-line error naming the flag and the file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmeta.common.images import IMAGE_SUFFIXES, load_image, load_image_folder
from fedmeta.common.models import ModelSpec
from fedmeta.common.tasks import is_classification

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Exported:
    """An exported model: model/model.json plus model/model.safetensors (see server/rundir.py)."""

    folder: Path
    spec: ModelSpec
    algorithm: str
    task: str
    params: Params
    adapt: dict[str, Any]
    version: str
    allowed_imports: frozenset[str] = frozenset()  # the local operator's --allow-model-import, not the file's
    clusters: int = 1  # --clusters K: params holds K θ's named cluster.<j>.<name>
    run: dict[str, Any] = field(default_factory=dict)  # model.json's "run": the settings it was trained with


@dataclass(frozen=True)
class Examples:
    """x [N, ...] float32; y [N] int64 class indices or [N, 1] float32 targets, or None; a name per row."""

    x: torch.Tensor
    y: torch.Tensor | None
    names: tuple[str, ...]
    classes: tuple[str, ...]


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {text!r} (NaN and infinities are refused)")
    return value


def read_csv(path: Path, *, inputs: int | None, classification: bool, classes: tuple[str, ...] | None,
             target_required: bool) -> Examples:
    """A CSV with a header: `inputs` numeric columns, then the target (a value, or a class label of any text).

    `inputs` None takes every column but the last. The target may be left out unless
    `target_required`. With `classes` given (the support set's), labels must be among them;
    otherwise the sorted unique labels are the classes 0..N-1.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read this CSV file ({exc})") from exc
    if not rows:
        raise ValueError(f"{path}: expected a header row and examples, got an empty file")
    header = rows[0][1]
    if all(_is_number(c) for c in header):
        raise ValueError(f"{path}: expected a header row (column names) first, got numbers {header[:4]!r}")
    n_in = len(header) - 1 if inputs is None else inputs
    allowed = [n_in + 1] if target_required else [n_in, n_in + 1]
    if n_in < 1 or len(header) not in allowed:
        target = " + target" if target_required else ", then optionally the target"
        raise ValueError(f"{path}: expected {' or '.join(map(str, allowed))} columns ({n_in} input"
                         f"{'s' * (n_in != 1)}{target}), got {len(header)}")
    has_target = len(header) == n_in + 1
    xs: list[list[float]] = []
    targets: list[str] = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path} line {line}: expected {len(header)} columns like the header, got {len(row)}")
        xs.append([_number(row[j], f"{path} line {line} column {header[j]!r}") for j in range(n_in)])
        if has_target:
            targets.append(row[n_in].strip())
    x = torch.tensor(xs, dtype=torch.float32).reshape(len(xs), n_in)
    names = tuple(str(i) for i in range(len(xs)))
    if not has_target:
        return Examples(x, None, names, classes or ())
    if not classification:
        y = [_number(t, f"{path} line {rows[i + 1][0]} column {header[n_in]!r}") for i, t in enumerate(targets)]
        return Examples(x, torch.tensor(y, dtype=torch.float32).reshape(-1, 1), names, ())
    if any(not t for t in targets):
        raise ValueError(f"{path}: expected a class label in every row of column {header[n_in]!r}, got an empty one")
    if classes is None:
        classes = tuple(sorted(set(targets)))
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not classes of the support set {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return Examples(x, torch.tensor([index[t] for t in targets], dtype=torch.int64), names, classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_examples(path: Path, *, exported: Exported, support: Examples | None) -> Examples:
    """The support set (support None) or the query set, from an image folder or a CSV file."""
    flag = "--support" if support is None else "--query"
    classification = is_classification(exported.task)
    if path.is_dir():
        if not classification:
            raise ValueError(f"{flag} {path}: image folders need a classification model; this one is for "
                             f"{exported.task!r} regression: give a CSV")
        size = int(exported.spec.kwargs.get("image_size", 28))
        images = load_image_folder(path, size, classes=None if support is None else support.classes)
        if support is None and images.labels is None:
            raise ValueError(f"--support {path}: expected one sub-folder of images per class, got images only")
        y = None if images.labels is None else torch.from_numpy(images.labels)
        return Examples(torch.from_numpy(images.pixels), y, images.names, images.classes)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file or folder")
    if support is not None and path.suffix.lower() in IMAGE_SUFFIXES:  # one drawing to predict
        if not classification:
            raise ValueError(f"--query {path}: an image needs a classification model; this one is for "
                             f"{exported.task!r} regression: give a CSV")
        size = int(exported.spec.kwargs.get("image_size", 28))
        pixels = torch.from_numpy(load_image(path, size)).to(torch.float32).div(255.0).reshape(1, 1, size, size)
        return Examples(pixels, None, (path.name,), support.classes)
    inputs = exported.spec.kwargs.get("in_features")
    if support is not None:
        inputs = support.x.shape[1]
    elif not isinstance(inputs, int):
        inputs = None
    return read_csv(path, inputs=inputs, classification=classification, target_required=support is None,
                    classes=None if support is None else support.classes)
