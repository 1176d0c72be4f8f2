"""The one inner-loop kernel and the pieces around it: functional losses, task mapping, the update tail.

Every gradient-based algorithm here adapts with the same differentiable SGD path

    theta_0 = theta,    theta_{j+1}[n] = theta_j[n] - a_j[n] * g_j[n],    g_j = grad_theta_j L(theta_j)

over the parameter names n it adapts, and differs only in what it passes (cf. learn2learn, whose
`maml_update` and `meta_sgd_update` differ only in their learning rate):

    algorithm   step size a_j[n]                first_order     only    keep_path
    MAML        --inner-lr                       no              all     no
    FOMAML      --inner-lr                       (see below)     all     no
    Meta-SGD    alpha[n], learned (dict)         no              all     no
    MAML++      lslr_j[n], learned (callable)    first rounds    all     yes (multi-step loss)
    Meta-Curv.  --inner-lr, g_j preconditioned   --curvature-    all     no
                by learned Kronecker factors     first-order
    ANIL        --inner-lr, on cached features   no              head    no
    Reptile     --inner-lr, support + query      (see below)     all     no
    FedAvg      --local-lr, one step per task    (see below)     all     no
    Per-FedAvg  alpha, then a beta `sgd_step`    (see below)     all     no

Under `torch.func.grad` the path is differentiated end to end, which gives MAML's second-order
term (Hessian-vector products through each g_j); `first_order` treats every g_j as a constant
(Finn et al. 2017, section 5.2) while the path stays differentiable in theta and the step sizes,
which MAML++'s first-order rounds need for their learned rates. A `precondition` hook
P(theta_j, g_j) replaces g_j by P's output before the step (Meta-Curvature's learned curvature
matrices, read from theta_j's "meta." entries); it runs after first_order's detach, so the path
stays differentiable in what P reads. Where nothing differentiates the
path it is plain SGD and first order already, so FOMAML (the path run outside the meta-gradient,
which is then taken at theta'), Reptile, FedAvg and Per-FedAvg leave the flag off: detaching would
cost a few per cent per step (sinusoid MLP, one thread) and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmeta.common.algorithms.base import ClientUpdate
from fedmeta.common.tasks import LossFn, TaskBatch

Params = dict[str, torch.Tensor]
EXTRA = "meta."  # prefix of meta-parameters that are not the model's (e.g. Meta-SGD's step sizes)
# a_j[n]: one float for every step and name (MAML), one tensor per name shaped like it
# (Meta-SGD's alpha), or a rule (step j, name n) -> scalar or tensor (MAML++'s per-step per-layer rates).
StepSize = float | Params | Callable[[int, str], torch.Tensor | float]
Objective = Callable[[Params], torch.Tensor]
# P(theta_j, g_j) -> the gradient the step uses, for the same names (Meta-Curvature's M g).
Precondition = Callable[[Params, Params], Params]


def model_part(params: Params) -> Params:
    """The model's own parameters, without the algorithm's extra meta-parameters."""
    return {k: v for k, v in params.items() if not k.startswith(EXTRA)}


def forward(model: nn.Module, params: Params, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """f_params(x), the model evaluated functionally on its own parameters.

    `context` is the task's support set when x is its queries: models that normalise with
    the support set's statistics (Conv4 norm="support") use it, the others ignore it.
    """
    if context is not None and getattr(model, "takes_context", False):
        return functional_call(model, model_part(params), (x,), {"context": context})
    return functional_call(model, model_part(params), (x,))


def loss_at(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
            context: torch.Tensor | None = None) -> torch.Tensor:
    """L(f_params(x), y) with the model evaluated functionally (`context`: see `forward`)."""
    return loss_fn(forward(model, params, x, context), y)


def step_size(lr: StepSize, step: int, name: str) -> torch.Tensor | float:
    """a_step[name] under the rule `lr`."""
    if callable(lr):
        return lr(step, name)
    if isinstance(lr, dict):
        return lr[name]
    return lr


def sgd_step(params: Params, g: Params, lr: StepSize, step: int = 0) -> Params:
    """theta[n] - a_step[n] * g[n] for the names in g; every other entry of params as it is."""
    return {**params, **{k: params[k] - step_size(lr, step, k) * g[k] for k in g}}


@overload
def sgd_path(objective: Objective, params: Params, *, steps: int, lr: StepSize, first_order: bool = ...,
             only: Collection[str] | None = ..., keep_path: Literal[False] = ...,
             precondition: Precondition | None = ...) -> Params: ...
@overload
def sgd_path(objective: Objective, params: Params, *, steps: int, lr: StepSize, first_order: bool = ...,
             only: Collection[str] | None = ..., keep_path: Literal[True],
             precondition: Precondition | None = ...) -> list[Params]: ...
def sgd_path(objective: Objective, params: Params, *, steps: int, lr: StepSize, first_order: bool = False,
             only: Collection[str] | None = None, keep_path: bool = False,
             precondition: Precondition | None = None) -> Params | list[Params]:
    """`steps` SGD steps on objective(theta), the kernel: theta_steps, or [theta_0, ..., theta_steps].

    objective maps the full parameter dict to a scalar loss; the gradient is taken over the names
    in `only` (default: the model's own, not the "meta." extras), the rest held fixed and returned
    untouched. first_order detaches each g_j from any enclosing differentiation; precondition
    (None: the identity) maps (theta_j, g_j) to the gradient the step takes.
    """
    names = [k for k in params if not k.startswith(EXTRA)] if only is None else list(only)
    path = [params]
    for j in range(steps):
        p = path[-1]
        g = grad(lambda sub, p=p: objective({**p, **sub}))({k: p[k] for k in names})
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        if precondition is not None:
            g = precondition(p, g)
        path.append(sgd_step(p, g, lr, j))
    return path if keep_path else path[-1]


@overload
def inner_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int,
               lr: StepSize, first_order: bool = ..., only: Collection[str] | None = ...,
               keep_path: Literal[False] = ..., precondition: Precondition | None = ...) -> Params: ...
@overload
def inner_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int,
               lr: StepSize, first_order: bool = ..., only: Collection[str] | None = ...,
               keep_path: Literal[True], precondition: Precondition | None = ...) -> list[Params]: ...
def inner_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int,
               lr: StepSize, first_order: bool = False, only: Collection[str] | None = None,
               keep_path: bool = False, precondition: Precondition | None = None) -> Params | list[Params]:
    """The kernel on one task's support loss L(f_theta(x), y): see `sgd_path`."""
    def support_loss(p: Params) -> torch.Tensor:
        return loss_at(model, p, x, y, loss_fn)

    path = sgd_path(support_loss, params, steps=steps, lr=lr, first_order=first_order, only=only, keep_path=True,
                    precondition=precondition)
    return path if keep_path else path[-1]


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


def client_update(tensors: Params, batch: TaskBatch, loss_pre: torch.Tensor, loss_post: torch.Tensor) -> ClientUpdate:
    """The update a client sends: detached tensors, weighted by its task count, with mean query losses."""
    return ClientUpdate(
        tensors={k: v.detach() for k, v in tensors.items()},
        weight=float(batch.num_tasks),
        metrics={"loss_pre": float(loss_pre.detach().mean()), "loss_post": float(loss_post.detach().mean())},
    )


def mean_over_tasks(per_task: Callable[..., tuple[Params, torch.Tensor, torch.Tensor]], params: Params,
                    batch: TaskBatch, *, vectorize: bool) -> ClientUpdate:
    """(1/T) sum_t u_t over the batch's T tasks, with per_task(theta, xs, ys, xq, yq) = (u_t, pre_t, post_t).

    u_t is a task's meta-gradient (MAML family) or parameter delta (Reptile); pre_t / post_t its
    query loss before / after adaptation, averaged into the metrics.
    """
    tensors, loss_pre, loss_post = map_tasks(per_task, params, batch, vectorize=vectorize)
    return client_update({k: v.mean(0) for k, v in tensors.items()}, batch, loss_pre, loss_post)


def query_losses(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn) -> torch.Tensor:
    """[L(f_params(xq_t), yq_t) for each task t], looped (for the sequential algorithms' metrics);
    queries normalised with their support set where the model does so (`forward`'s context)."""
    return torch.stack([loss_at(model, params, batch.x_query[t], batch.y_query[t], loss_fn, batch.x_support[t])
                        for t in range(batch.num_tasks)])
