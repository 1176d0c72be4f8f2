"""Per-FedAvg (Fallah et al. 2020): FedAvg on the one-step MAML objective.

Each client takes --local-steps (tau) steps on F(w) = L(w - alpha grad L(w, D), D') over its
tasks in turn (task t: D its support set, D' its query set), with alpha = --inner-lr and
beta = --local-lr:
  fo: w <- w - beta grad L(w~, D')                               (w~ = w - alpha grad L(w, D))
  hf: w <- w - beta (I - alpha H(w, D'')) grad L(w~, D')          (H v by a Hessian-vector product)
D'' is the task's support set again (the paper draws a third independent batch; a few-shot
task has no third set). The client sends w - theta; the server averages the deltas.
`adapt` is SGD with alpha, as MAML.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, Params, UpdateKind
from fedmeta.common.algorithms.fedavg import LOCAL_LR, LOCAL_STEPS, make_outer
from fedmeta.common.algorithms.inner import client_update, inner_path, loss_at, query_losses, sgd_step
from fedmeta.common.algorithms.maml import adapt
from fedmeta.common.settings import option
from fedmeta.common.tasks import LossFn, TaskBatch

VARIANT = option("perfedavg_variant", "fo", "perfedavg: fo (first order) or hf (Hessian-vector product)",
                 choices=("fo", "hf"), resume=True)


def local_step(model: nn.Module, w: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
               loss_fn: LossFn, *, alpha: float, beta: float, variant: str) -> Params:
    """One Per-FedAvg step on one task."""
    w_tilde = inner_path(model, w, xs, ys, loss_fn, steps=1, lr=alpha)
    g = grad(loss_at, argnums=1)(model, w_tilde, xq, yq, loss_fn, xs)
    if variant == "hf":
        v = {k: t.detach() for k, t in g.items()}

        def grad_dot_v(p: Params) -> torch.Tensor:
            gp = grad(loss_at, argnums=1)(model, p, xs, ys, loss_fn)
            return sum((gp[k] * v[k]).sum() for k in gp)  # type: ignore[return-value]

        hv = grad(grad_dot_v)(w)  # H(w, D'') g by reverse-over-reverse (forward-over-reverse hits ZeroTensors)
        g = {k: g[k] - alpha * hv[k] for k in g}
    return sgd_step(w, g, beta)


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    w = {k: v.detach() for k, v in params.items()}
    loss_pre = query_losses(model, w, batch, loss_fn)
    loss_post = torch.stack([loss_at(model, adapt(model, w, batch.x_support[t], batch.y_support[t], loss_fn, steps=1,
                                                  lr=inner.lr), batch.x_query[t], batch.y_query[t], loss_fn,
                                     batch.x_support[t])
                             for t in range(batch.num_tasks)])  # F(theta): the query loss after one adaptation step
    beta, variant = inner.option(LOCAL_LR), inner.option(VARIANT)
    for step in range(inner.option(LOCAL_STEPS)):
        t = step % batch.num_tasks
        w = local_step(model, w, batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t],
                       loss_fn, alpha=inner.lr, beta=beta, variant=variant)
    return client_update({k: w[k] - params[k] for k in params}, batch, loss_pre, loss_post)


ALGORITHM = Algorithm(
    name="perfedavg",
    update_kind=UpdateKind.PARAMETER_DELTA,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1.0,
    adapt=adapt,
    options=(LOCAL_STEPS, LOCAL_LR, VARIANT),
)
