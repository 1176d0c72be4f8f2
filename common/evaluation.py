"""Few-shot evaluation: adapt on each held-out task's support set, measure on its query set."""

from __future__ import annotations

import torch
from torch import nn

from common.algorithms import Algorithm
from common.algorithms.inner import Params, loss_at, map_tasks
from common.tasks import LossFn, TaskBatch


def evaluate(
    algorithm: Algorithm,
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    vectorize: bool = True,
) -> dict[str, float]:
    """Mean query loss before (theta) and after (algorithm.adapt(theta, support)) adaptation."""

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        adapted = algorithm.adapt(model, p, xs, ys, loss_fn, steps=steps, lr=lr)
        return loss_at(model, p, xq, yq, loss_fn), loss_at(model, adapted, xq, yq, loss_fn)

    loss_pre, loss_post = map_tasks(per_task, params, batch, vectorize=vectorize)
    return {"loss_pre": float(loss_pre.mean()), "loss_post": float(loss_post.mean())}
