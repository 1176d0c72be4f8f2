"""The algorithm interface: a client step, a server step and adapt, over flat parameter dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch
from torch import nn

from fedmeta.common.settings import Setting
from fedmeta.common.tasks import LossFn, TaskBatch

Params = dict[str, torch.Tensor]
# A fedmeta.common.config.RunConfig. Not imported: the config imports the algorithms (for their options).
RunConfig = Any


class UpdateKind(Enum):
    META_GRADIENT = "meta_gradient"
    PARAMETER_DELTA = "parameter_delta"


@dataclass(frozen=True)
class InnerConfig:
    """What a client step needs besides the parameters and the batch.

    steps/lr: the inner loop. round_index/rounds: where the run is (MAML++ switches to second
    order, Per-FedAvg and FedAvg ignore them). options: the run's settings by field name, copied
    by `from_run`; an algorithm reads its own with `option` (its declared default when absent).
    """

    steps: int
    lr: float
    vectorize: bool = True
    round_index: int = 0
    rounds: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, setting: Setting) -> Any:
        return self.options.get(setting.field or setting.name, setting.field_default)

    @classmethod
    def from_run(cls, run: RunConfig, *, round_index: int = 0, vectorize: bool = True) -> InnerConfig:
        options = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
        return cls(steps=run.inner_steps, lr=run.inner_lr, vectorize=vectorize, round_index=round_index,
                   rounds=run.rounds, options=options)


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
    """Server-step hyperparameters; cosine anneals Adam's learning rate to 0 over the run (MAML++)."""

    lr: float
    rounds: int
    cosine: bool = False


@dataclass(frozen=True)
class Algorithm:
    """One meta-learning algorithm, as the three functions the system needs."""

    name: str
    update_kind: UpdateKind
    client_step: ClientStep
    make_outer: Callable[[OuterConfig], OuterStep]
    default_outer_lr: float
    adapt: Adapt
    # Meta-parameters beyond the model's, named "meta.<...>" (Meta-SGD's step sizes), from
    # the model's initial parameters and the run; broadcast, updated and exported with them.
    extra_parameters: Callable[[Params, RunConfig], Params] | None = None
    # A prediction rule other than the adapted model's forward pass (ProtoNets' prototypes).
    predict: Callable[[nn.Module, Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Raises ValueError naming the flag when the run's settings do not suit the algorithm.
    check: Callable[[RunConfig], None] | None = None
    # Parameters after 0..steps adaptation steps, when adapt(steps=1) repeated is not the same.
    adapt_path: Callable[..., list[Params]] | None = None
    # The inner loop runs on the model's head only (ANIL): evaluation and compute reports say so.
    head_only: bool = False
    # The step sizes are meta-learned for --inner-steps steps (Meta-SGD, MAML++): evaluation
    # adapts that many steps unless --eval-steps says otherwise; more can diverge.
    learned_steps: bool = False
    # False: no adaptation steps at all (ProtoNets predict from the support set's prototypes), so
    # evaluation takes none, reports steps 0 and no adaptation curve.
    adapts: bool = True
    # The algorithm's own run settings (fedmeta.common.settings.option), declared in its module; RunConfig
    # gets each as a field, the server a flag (an option shared by two algorithms: the same object).
    options: tuple[Setting, ...] = ()
    # The algorithm with the run's settings (a mapping by field name: a RunConfig's, or the "run" of an
    # exported model.json) bound into `predict`, for a prediction rule that has settings (Matching
    # Nets' --matching-steps, Relation Nets' --relation-pool); raises ValueError naming the flag.
    bind: Callable[[Mapping[str, Any]], Algorithm] | None = None
