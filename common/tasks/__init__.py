"""Task families: each samples meta-batches of few-shot tasks, seeded, as stacked tensors.

A family is built for one data holder (`make_tasks`): its data seed, its shard of a
partitioned data set, and its local data directory. `sample("train", ...)` draws from
what this holder trains on; `sample("eval", ...)` draws held-out tasks that no client
trained on (new sinusoids, new client offsets, unseen Omniglot classes), and
`sample("val", ...)` validation tasks for model selection during training, disjoint from
both (other seeds; for Omniglot, characters set aside from the training alphabets).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from common.config import RunConfig

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


def make_tasks(
    run: RunConfig, *, data_seed: int = 0, shard: int = 0, data_dir: str | Path | None = None
) -> TaskFamily:
    """The task family of `run.task` as seen by one data holder.

    `shard` is taken modulo `run.shards`; `data_dir` is needed by families backed by files.
    """
    if run.task == "sinusoid":
        from common.tasks.sinusoid import SinusoidTasks

        return SinusoidTasks()
    if run.task == "gaussian":
        from common.tasks.gaussian import GaussianTasks

        return GaussianTasks(ways=run.ways, dim=run.dim, client_seed=data_seed)
    if run.task == "omniglot":
        from common.tasks.omniglot import OmniglotTasks

        if data_dir is None:
            raise ValueError("--task omniglot: needs --data-dir, the folder holding the Omniglot archives "
                             "(images_background*.zip, images_evaluation.zip) or their extracted trees")
        return OmniglotTasks(Path(data_dir), ways=run.ways, partition=run.partition, shards=run.shards,
                             shard=shard % run.shards, seed=run.seed, rotations=run.rotations,
                             validation=run.eval_every > 0)
    raise ValueError(f"unknown task {run.task!r}: expected one of {sorted(TASKS)}")


def sample_batch(task: str, *, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
    """A training meta-batch of a family that needs no data or holder (sinusoid), for tests and benchmarks."""
    if task != "sinusoid":
        raise ValueError(f"unknown task {task!r} for sample_batch: only 'sinusoid' needs no data holder; use make_tasks")
    from common.tasks.sinusoid import SinusoidTasks

    return SinusoidTasks().sample("train", num_tasks=num_tasks, shots=shots, queries=queries, seed=seed)
