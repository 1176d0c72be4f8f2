"""MAML++ (Antoniou et al. 2019, "How to train your MAML"), the pieces that change the protocol.

- Multi-step loss (MSL, --no-msl turns it off): the client's objective is sum_j w_j L_query(theta_j)
  over the inner steps j = 1..S, with w_j uniform at first and annealed towards the last step
  over the first tenth of the run (non-final weights floor at 0.03 / S).
- Learned per-layer, per-step inner learning rates (LSLR, --no-lslr): one scalar per parameter
  tensor and step, named "meta.lslr.<step>.<name>", initialised to --inner-lr; meta-parameters
  that are broadcast, updated with theta and exported (adapt uses them; steps beyond the
  trained ones reuse the last step's rates).
- Derivative-order annealing: first order for the first --first-order-rounds rounds, then second.
- Cosine-annealed outer learning rate (--no-cosine-outer turns it off).
Per-step batch-norm statistics (BNRS/BNWB) are not included: Conv4 here normalises with
batch statistics and keeps no running statistics to specialise per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import EXTRA, inner_path, loss_at, mean_over_tasks
from fedmeta.common.algorithms.outer import AdamOuter
from fedmeta.common.settings import option
from fedmeta.common.tasks import LossFn, TaskBatch

LSLR = EXTRA + "lslr."
FIRST_ORDER_ROUNDS = option("first_order_rounds", 0, "mamlpp: rounds trained first order before second order",
                            minimum=0, resume=True)
MSL = option("msl", True, "mamlpp: no multi-step loss (only the last inner step's query loss)", invert=True,
             resume=True)
LSLR_OPTION = option("lslr", True, "mamlpp: no learned per-layer per-step inner learning rates", invert=True,
                     resume=True)
COSINE_OUTER = option("cosine_outer", True, "mamlpp: constant outer learning rate instead of cosine annealing",
                      invert=True, resume=True)


def extra_parameters(params: Params, run) -> Params:  # type: ignore[no-untyped-def]
    if not run.lslr:
        return {}
    steps = max(1, run.inner_steps)
    return {f"{LSLR}{j}.{k}": torch.tensor(float(run.inner_lr)) for j in range(steps) for k in params}


def lslr(params: Params, lr: float) -> Callable[[int, str], torch.Tensor | float]:
    """The kernel's step-size rule: (step j, name) -> meta.lslr.<j>.<name>, the last trained step's
    beyond them, or `lr` when the run learns no rates (--no-lslr)."""

    def rate(step: int, name: str) -> torch.Tensor | float:
        if f"{LSLR}0.{name}" not in params:
            return lr
        j = step
        while j > 0 and f"{LSLR}{j}.{name}" not in params:
            j -= 1
        return params[f"{LSLR}{j}.{name}"]

    return rate


def adapt_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *,
               steps: int, lr: float, first_order: bool = False) -> list[Params]:
    """theta_0 = theta, theta_{j+1} = theta_j - lr_{j, layer} grad L_support(theta_j)."""
    return inner_path(model, params, x, y, loss_fn, steps=steps, lr=lslr(params, lr), first_order=first_order,
                      keep_path=True)


def adapt(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *,
          steps: int, lr: float) -> Params:
    return adapt_path(model, params, x, y, loss_fn, steps=steps, lr=lr)[-1]


def msl_weights(steps: int, round_index: int, rounds: int, *, enabled: bool) -> list[float]:
    """Per-step loss weights: uniform at round 0, all on the last step after a tenth of the run."""
    if steps <= 1 or not enabled:
        return [0.0] * (steps - 1) + [1.0] if steps else []
    horizon = max(1, math.ceil(rounds / 10))
    progress = min(1.0, round_index / horizon)
    floor = 0.03 / steps
    other = max(floor, (1.0 / steps) * (1.0 - progress))
    return [other] * (steps - 1) + [1.0 - other * (steps - 1)]


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    steps = max(1, inner.steps)
    weights = msl_weights(steps, inner.round_index, inner.rounds, enabled=inner.option(MSL))
    first_order = inner.round_index < inner.option(FIRST_ORDER_ROUNDS)

    def objective(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        path = adapt_path(model, p, xs, ys, loss_fn, steps=steps, lr=inner.lr, first_order=first_order)
        losses = [loss_at(model, path[j + 1], xq, yq, loss_fn, xs) for j in range(steps)]
        total = sum(w * loss for w, loss in zip(weights, losses))
        return total, losses[-1]

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        g, loss_post = grad(objective, has_aux=True)(p, xs, ys, xq, yq)
        return g, loss_at(model, p, xq, yq, loss_fn, xs), loss_post

    return mean_over_tasks(per_task, params, batch, vectorize=inner.vectorize)


def make_outer(config: OuterConfig) -> AdamOuter:
    return AdamOuter(config)


ALGORITHM = Algorithm(
    name="mamlpp",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=3e-3,
    adapt=adapt,
    extra_parameters=extra_parameters,
    adapt_path=adapt_path,
    learned_steps=True,
    options=(FIRST_ORDER_ROUNDS, MSL, LSLR_OPTION, COSINE_OUTER),
)
