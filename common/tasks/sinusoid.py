"""Sinusoid regression (Finn et al. 2017, section 5.1).

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5], phase phi ~ U[0, pi];
inputs x ~ U[-5, 5]. Loss: mean squared error.

Families (a data holder's --task-family, for federations that mix task families): "a" draws
the phase from U[0, pi/2], "b" from U[pi, 3 pi/2] (so a "b" task is minus an "a" task: the
two pull a shared initialisation apart); "all" is the whole range above.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedmeta.common.tasks.base import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
FAMILIES = {"all": PHASE, "a": (0.0, math.pi / 2), "b": (math.pi, 1.5 * math.pi)}


class SinusoidTasks:
    """Samples sinusoid tasks as stacked tensors of shape [tasks, examples, 1].

    Every task is new, so "train" and "eval" draw from the same distribution; the
    seeds (STREAM_TRAIN vs STREAM_EVAL) keep them apart.
    """

    classification = False

    def __init__(self, family: str = "all") -> None:
        if family not in FAMILIES:
            raise ValueError(f"--task-family: expected one of {', '.join(FAMILIES)} for sinusoid, got {family!r}")
        self.phase = FAMILIES[family]

    def sample(self, split: str, *, num_tasks: int, shots: int, queries: int, seed: int,
               ways: int | None = None) -> TaskBatch:
        """`ways` is for classification families; regression ignores it."""
        from fedmeta.common.tasks.base import TaskBatch

        generator = torch.Generator().manual_seed(seed)
        amp = torch.empty(num_tasks, 1, 1).uniform_(*AMPLITUDE, generator=generator)
        phase = torch.empty(num_tasks, 1, 1).uniform_(*self.phase, generator=generator)
        x = torch.empty(num_tasks, shots + queries, 1).uniform_(*X_RANGE, generator=generator)
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    @staticmethod
    def curve(amp: float, phase: float, x: torch.Tensor) -> torch.Tensor:
        """The true function of one task, for plots."""
        return amp * torch.sin(x - phase)
