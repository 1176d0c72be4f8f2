"""Task families: each samples batches of few-shot tasks, seeded, as stacked tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.tasks.sinusoid import SinusoidTasks


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of tasks, stacked along dim 0.

    x_support: [tasks, shots, ...], y_support: [tasks, shots, ...],
    x_query: [tasks, queries, ...], y_query: [tasks, queries, ...].
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


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = {"sinusoid": SinusoidTasks}
LOSSES: dict[str, LossFn] = {"sinusoid": F.mse_loss}

# Streams of one client's task sequence; a fixed number keeps seeds stable across versions.
STREAM_TRAIN = 0
STREAM_EVAL = 1


def task_seed(run_seed: int, data_seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for one batch, independent across (run, client data, stream, round)."""
    seq = np.random.SeedSequence([run_seed, data_seed, stream, index])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_batch(
    task: str, *, num_tasks: int, shots: int, queries: int, seed: int
) -> TaskBatch:
    """Sample a meta-batch from a task family with a seed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    gen = torch.Generator().manual_seed(seed)
    return TaskBatch(*TASKS[task].sample(num_tasks=num_tasks, shots=shots, queries=queries, generator=gen))


def loss_for(task: str) -> LossFn:
    return LOSSES[task]
