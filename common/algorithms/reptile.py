"""Reptile (Nichol et al. 2018).

Per task: theta' = SGD^k(theta; all of the task's examples), and the client sends
the mean delta = theta' - theta over its tasks. Server: theta <- theta + eps_r * mean(delta),
eps_r annealed linearly from the outer learning rate to 0 over the run.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import inner_path, loss_at, mean_over_tasks
from fedmeta.common.algorithms.maml import adapt
from fedmeta.common.algorithms.outer import ReptileOuter
from fedmeta.common.tasks import LossFn, TaskBatch


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        adapted = inner_path(model, p, torch.cat([xs, xq]), torch.cat([ys, yq]), loss_fn, steps=inner.steps,
                             lr=inner.lr)
        delta = {k: adapted[k] - p[k] for k in p}
        return delta, loss_at(model, p, xq, yq, loss_fn, xs), loss_at(model, adapted, xq, yq, loss_fn, xs)

    return mean_over_tasks(per_task, params, batch, vectorize=inner.vectorize)


def make_outer(config: OuterConfig) -> ReptileOuter:
    return ReptileOuter(config)


ALGORITHM = Algorithm(
    name="reptile",
    update_kind=UpdateKind.PARAMETER_DELTA,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1.0,
    adapt=adapt,
)
