"""Meta-Curvature (Park & Oliva 2019, NeurIPS): MAML with a learned, Kronecker-factored preconditioner.

Inner loop: theta' = theta - a * M(g), g = grad L_support(theta), a = --inner-lr, with M per
parameter tensor a product of learned matrices, one per tensor mode (the paper's eq. 5-7):

    weight (out, in, k, k):  G' = G x1 M_o x2 M_i x3 M_f   (G as out x in x k*k;
                             M_o out x out, M_i in x in, M_f k*k x k*k)
    weight (out, in):        G' = G x1 M_o x2 M_i = M_o G M_i^T
    bias / norm scale (d,):  G' = M_b g (M_b d x d), or m_b * g (--curvature-bias diagonal)

where (G x_n M)[.., a, ..] = sum_p M[a, p] G[.., p, ..] is the mode-n product: vec(G') =
(M_o kron M_i kron M_f) vec(G) with vec row-major, a full-matrix preconditioner of
prod(dims)^2 entries stored in sum(dims^2). Tensors of more modes fold the trailing ones
into the last factor; scalars are not preconditioned. The matrices are meta-parameters named
"meta.mc.<mode>.<name>" (mode: out, in, filter, diag), initialised to the identity (ones for
diag), so the first round is MAML's; they are broadcast, aggregated with theta (Adam), checkpointed,
exported, and used by `adapt` (fedmeta-adapt). The client sends the meta-gradient for theta and
every M, second order through the inner loop; --curvature-first-order treats each g as a constant
(the path stays differentiable in theta and M, so M still learns: dtheta'/dM = -a g).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import EXTRA, inner_path
from fedmeta.common.algorithms.maml import make_outer, meta_gradient
from fedmeta.common.settings import option
from fedmeta.common.tasks import LossFn, TaskBatch

CURVATURE = EXTRA + "mc."
MODES = ("out", "in", "filter")
BIAS = option("curvature_bias", "full", "metacurvature: curvature of 1-d tensors (biases, norm scales): a full "
              "d x d matrix or its diagonal", choices=("full", "diagonal"), resume=True)
FIRST_ORDER = option("curvature_first_order", False, "metacurvature: first order (inner gradients as constants; "
                     "theta and the curvature matrices still learn)", resume=True)


def factor_sizes(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The side of each mode's matrix: (out,), (out, in), or (out, in, prod(rest)); () for a scalar."""
    if len(shape) <= 2:
        return tuple(shape)
    return (shape[0], shape[1], math.prod(shape[2:]))


def extra_parameters(params: Params, run) -> Params:  # type: ignore[no-untyped-def]
    """Identity curvature for every model tensor (a vector of ones for a diagonal bias curvature)."""
    extra: Params = {}
    for name, v in params.items():
        sizes = factor_sizes(v.shape)
        if len(sizes) == 1 and run.curvature_bias == "diagonal":
            extra[f"{CURVATURE}diag.{name}"] = torch.ones(sizes[0], dtype=v.dtype)
            continue
        for mode, d in zip(MODES, sizes):
            extra[f"{CURVATURE}{mode}.{name}"] = torch.eye(d, dtype=v.dtype)
    return extra


def precondition_one(params: Params, name: str, g: torch.Tensor) -> torch.Tensor:
    """M(g) for the tensor `name`: g times its curvature matrices, mode by mode (see the module's docstring)."""
    diag = params.get(f"{CURVATURE}diag.{name}")
    if diag is not None:
        return diag * g
    factors = [params[f"{CURVATURE}{m}.{name}"] for m in MODES if f"{CURVATURE}{m}.{name}" in params]
    if not factors:  # a scalar, or a model tensor the curvature was not built for
        return g
    if len(factors) == 1:
        return factors[0] @ g
    if len(factors) == 2:
        return factors[0] @ g @ factors[1].T
    folded = g.reshape(*factor_sizes(g.shape))
    return torch.einsum("ap,bq,cr,pqr->abc", *factors, folded).reshape(g.shape)


def precondition(params: Params, g: Params) -> Params:
    """The kernel's hook: M(g) for every adapted tensor, with the curvature read from theta_j's extras."""
    return {k: precondition_one(params, k, v) for k, v in g.items()}


def adapt(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int,
          lr: float, first_order: bool = False) -> Params:
    """theta_{j+1} = theta_j - lr * M(grad L_support(theta_j)), `steps` times, with the learned curvature M."""
    return inner_path(model, params, x, y, loss_fn, steps=steps, lr=lr, first_order=first_order,
                      precondition=precondition)


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    """Mean over tasks of grad_(theta, M) L_query(adapt(theta, M; support)), as MAML's `meta_gradient`."""
    adapt_fn = functools.partial(adapt, first_order=bool(inner.option(FIRST_ORDER)))
    return meta_gradient(model, params, batch, loss_fn, inner, first_order=False, adapt_fn=adapt_fn)


ALGORITHM = Algorithm(
    name="metacurvature",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=3e-3,
    adapt=adapt,
    extra_parameters=extra_parameters,
    learned_steps=True,
    options=(BIAS, FIRST_ORDER),
)
