"""The algorithm interface: a client step, a server step and adapt, over flat parameter dicts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from common.tasks import LossFn, TaskBatch

Params = dict[str, torch.Tensor]


class UpdateKind(Enum):
    META_GRADIENT = "meta_gradient"
    PARAMETER_DELTA = "parameter_delta"


@dataclass(frozen=True)
class InnerConfig:
    """Inner-loop hyperparameters: SGD steps and learning rate."""

    steps: int
    lr: float
    vectorize: bool = True


@dataclass(frozen=True)
class ClientUpdate:
    """What a client step returns: tensors named like the parameters, a weight, metrics."""

    tensors: Params
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class OuterStep(Protocol):
    """Server step: applies an aggregated update to the flat meta-parameters in place."""

    def step(self, theta: torch.Tensor, update: torch.Tensor, round_index: int) -> float:
        """Update ``theta`` (1-D float32) from the weighted-mean ``update``; return the lr used."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


ClientStep = Callable[[nn.Module, Params, TaskBatch, LossFn, InnerConfig], ClientUpdate]
Adapt = Callable[..., Params]


@dataclass(frozen=True)
class OuterConfig:
    """Server-step hyperparameters."""

    lr: float
    rounds: int


@dataclass(frozen=True)
class Algorithm:
    """One meta-learning algorithm, as the three functions the system needs."""

    name: str
    update_kind: UpdateKind
    client_step: ClientStep
    make_outer: Callable[[OuterConfig], OuterStep]
    default_outer_lr: float
    adapt: Adapt
