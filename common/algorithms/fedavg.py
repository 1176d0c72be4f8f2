"""FedAvg (McMahan et al. 2017), the baseline without meta-learning.

Each client runs plain SGD on all its local data for --local-steps passes: one step per
task of its meta-batch, on the task's support and query examples together, with
--local-lr. It sends theta_local - theta; the server averages the deltas
(theta <- theta + outer_lr * mean delta, outer_lr 1 by default). Evaluation fine-tunes
the averaged model k SGD steps on each held-out support set, so users see what
meta-learning buys over plain federated averaging.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import client_update, inner_path, query_losses
from fedmeta.common.algorithms.maml import adapt
from fedmeta.common.algorithms.outer import AverageOuter
from fedmeta.common.settings import option
from fedmeta.common.tasks import LossFn, TaskBatch

# Shared with Per-FedAvg (perfedavg.py lists the same objects).
LOCAL_STEPS = option("local_steps", 5, "perfedavg and fedavg: local steps (passes over the meta-batch for fedavg)",
                     minimum=1, resume=True)
LOCAL_LR = option("local_lr", 0.01, "perfedavg and fedavg: local learning rate (Per-FedAvg's beta)", minimum=0.0,
                  positive=True, resume=True)


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    x = torch.cat([batch.x_support, batch.x_query], 1)
    y = torch.cat([batch.y_support, batch.y_query], 1)
    p = {k: v.detach() for k, v in params.items()}
    lr = inner.option(LOCAL_LR)
    for _ in range(inner.option(LOCAL_STEPS)):
        for t in range(batch.num_tasks):
            p = inner_path(model, p, x[t], y[t], loss_fn, steps=1, lr=lr)
    return client_update({k: p[k] - params[k] for k in params}, batch, query_losses(model, params, batch, loss_fn),
                         query_losses(model, p, batch, loss_fn))


def make_outer(config: OuterConfig) -> AverageOuter:
    return AverageOuter(config)


ALGORITHM = Algorithm(
    name="fedavg",
    update_kind=UpdateKind.PARAMETER_DELTA,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1.0,
    adapt=adapt,
    options=(LOCAL_STEPS, LOCAL_LR),
)
