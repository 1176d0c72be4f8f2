"""The task families' shared types: a meta-batch, a family, the seeds of its streams, losses.

Kept apart from `common.tasks` (which builds families) so that the families' modules import
these without importing their own package back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

Split = Literal["train", "val", "eval"]


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of tasks, stacked along dim 0.

    x_support: [tasks, shots, ...], y_support: [tasks, shots, ...],
    x_query: [tasks, queries, ...], y_query: [tasks, queries, ...].
    For classification, "shots" is ways x shots and labels are int64 class indices.
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.x_support.shape[0])

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device) for t in (self.x_support, self.y_support, self.x_query, self.y_query)))


class TaskFamily(Protocol):
    """One data holder's view of a task family."""

    classification: bool

    def sample(self, split: Split, *, num_tasks: int, shots: int, queries: int, seed: int,
               ways: int | None = None) -> TaskBatch:
        """A meta-batch; for classification, shots and queries are per class, `ways` overrides the family's."""
        ...


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = ("gaussian", "omniglot", "sinusoid")
CLASSIFICATION = frozenset({"gaussian", "omniglot"})
PARTITIONS = ("alphabet", "characters", "iid")
# Streams of one client's task sequence; a fixed number keeps seeds stable across versions.
STREAM_TRAIN = 0
STREAM_EVAL = 1
STREAM_VAL = 2


def task_seed(run_seed: int, data_seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for one batch, independent across (run, client data, stream, round)."""
    seq = np.random.SeedSequence([run_seed, data_seed, stream, index])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def loss_for(task: str) -> LossFn:
    """Cross-entropy for classification families, mean squared error for regression."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    return F.cross_entropy if task in CLASSIFICATION else F.mse_loss


def is_classification(task: str) -> bool:
    return task in CLASSIFICATION


def default_shard(client_id: str, data_seed: int) -> int:
    """A client's data share when none is given: the number its id ends with ("client-3" -> 3), else its data seed."""
    match = re.search(r"(\d+)$", client_id)
    return int(match.group(1)) if match else data_seed


class TaskSettings(Protocol):
    """What building a task family reads of the run configuration (a common.config.RunConfig)."""

    task: str
    ways: int
    dim: int
    partition: str
    shards: int
    seed: int
    rotations: bool
    eval_every: int
