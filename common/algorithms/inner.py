"""Pieces shared by the algorithms: functional losses, the SGD inner loop, task mapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from common.tasks import LossFn, TaskBatch

Params = dict[str, torch.Tensor]
EXTRA = "meta."  # prefix of meta-parameters that are not the model's (e.g. Meta-SGD's step sizes)


def model_part(params: Params) -> Params:
    """The model's own parameters, without the algorithm's extra meta-parameters."""
    return {k: v for k, v in params.items() if not k.startswith(EXTRA)}


def forward(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """f_params(x), the model evaluated functionally on its own parameters."""
    return functional_call(model, model_part(params), (x,))


def loss_at(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """L(f_params(x), y) with the model evaluated functionally."""
    return loss_fn(forward(model, params, x), y)


def sgd_adapt(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
) -> Params:
    """k steps of plain SGD on one task: p <- p - lr * grad_p L(f_p(x), y).

    Differentiable: when called under ``torch.func.grad`` the inner gradients are
    themselves differentiated, which gives MAML's second-order term.
    """
    p = params
    for _ in range(steps):
        g = grad(loss_at, argnums=1)(model, model_part(p), x, y, loss_fn)
        p = {**p, **{k: p[k] - lr * g[k] for k in g}}
    return p


def _stack(results: list[Any]) -> Any:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(results)
    if isinstance(first, dict):
        return {k: _stack([r[k] for r in results]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack([r[i] for r in results]) for i in range(len(first)))
    raise TypeError(f"cannot stack {type(first).__name__}")


def map_tasks(
    fn: Callable[..., Any], params: Params, batch: TaskBatch, *, vectorize: bool = True
) -> Any:
    """Apply fn(params, xs, ys, xq, yq) to every task of the batch and stack the results.

    With ``vectorize`` the tasks run as one ``torch.func.vmap`` call; otherwise in a loop
    (for models that vmap cannot batch, or when the loop is faster).
    """
    tensors = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    if vectorize:
        return vmap(fn, in_dims=(None, 0, 0, 0, 0))(params, *tensors)
    return _stack([fn(params, *(t[i] for t in tensors)) for i in range(batch.num_tasks)])
