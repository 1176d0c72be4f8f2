"""MAML (Finn et al. 2017), second order.

Per task: theta' = SGD^k(theta; support), and the client sends the weighted mean over
its tasks of grad_theta L_query(theta'), differentiating through the inner loop
(the Hessian-vector products of the second-order term included).
Server: Adam on the weighted mean meta-gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.func import grad

from fedmeta.common.algorithms.base import Adapt, Algorithm, ClientUpdate, InnerConfig, OuterConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import inner_path, loss_at, mean_over_tasks
from fedmeta.common.algorithms.outer import AdamOuter
from fedmeta.common.tasks import LossFn, TaskBatch


def adapt(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int, lr: float
) -> Params:
    """theta' = SGD^steps(theta; x, y), one step size: the personalisation rule MAML meta-learns for."""
    return inner_path(model, params, x, y, loss_fn, steps=steps, lr=lr)


def meta_gradient(
    model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig, *, first_order: bool,
    adapt_fn: Adapt = adapt,
) -> ClientUpdate:
    """Mean over tasks of grad_theta L_query(adapt_fn(theta; support)).

    adapt_fn is the inner loop (plain SGD for MAML; Meta-SGD and ANIL pass their own). first_order
    (FOMAML) runs it outside the gradient and returns grad_{theta'} L_query(theta') instead: the
    inner loop's Jacobian replaced by the identity, and no graph kept through it.
    """

    def query_loss(p: Params, xs: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_at(model, p, xq, yq, loss_fn, xs)  # xs: the support set whose statistics Conv4 may use
        return loss, loss

    def query_loss_after(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        return query_loss(adapt_fn(model, p, xs, ys, loss_fn, steps=inner.steps, lr=inner.lr), xs, xq, yq)

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        loss_pre = loss_at(model, p, xq, yq, loss_fn, xs)
        if first_order:
            adapted = adapt_fn(model, p, xs, ys, loss_fn, steps=inner.steps, lr=inner.lr)
            g, loss_post = grad(query_loss, has_aux=True)(adapted, xs, xq, yq)
        else:
            g, loss_post = grad(query_loss_after, has_aux=True)(p, xs, ys, xq, yq)
        return g, loss_pre, loss_post

    return mean_over_tasks(per_task, params, batch, vectorize=inner.vectorize)


def make_outer(config: OuterConfig) -> AdamOuter:
    return AdamOuter(dataclasses.replace(config, cosine=False))  # a constant lr; MAML++ anneals


def meta_algorithm(name: str, *, first_order: bool = False, adapt_fn: Adapt = adapt, **options: Any) -> Algorithm:
    """A member of the MAML family: `meta_gradient` over adapt_fn, Adam on the server, adapt_fn to personalise.

    What differs between members is adapt_fn (the inner loop), first_order, and the Algorithm
    options they add (options: extra_parameters, head_only, learned_steps, ...).
    """

    def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn,
                    inner: InnerConfig) -> ClientUpdate:
        return meta_gradient(model, params, batch, loss_fn, inner, first_order=first_order, adapt_fn=adapt_fn)

    return Algorithm(name=name, update_kind=UpdateKind.META_GRADIENT, client_step=client_step, make_outer=make_outer,
                     default_outer_lr=3e-3, adapt=adapt_fn, **options)


ALGORITHM = meta_algorithm("maml")
