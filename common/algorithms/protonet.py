"""Prototypical networks (Snell et al. 2017).

No inner loop: the model is an encoder; a class's prototype is the mean embedding of its
support examples, and a query's logits are minus its squared Euclidean distances to the
prototypes. The client sends the gradient of the query cross-entropy (mean over tasks);
the server steps with Adam. `adapt` leaves the parameters as they are: prototypes are
computed from the support set at prediction time, so accuracy "before" and "after"
adaptation coincide, evaluation takes no steps and reports no adaptation curve.
Classification only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, Params, UpdateKind
from fedmeta.common.algorithms.inner import forward, mean_over_tasks
from fedmeta.common.algorithms.maml import make_outer
from fedmeta.common.tasks import LossFn, TaskBatch, is_classification

_ABSENT = -1e4  # logit of a label with no support example (labels are dense, so only padding)


def predict(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Logits of xq: minus squared distances to the class prototypes of (xs, ys).

    Labels index the columns; there are as many columns as support examples (an upper bound
    on the classes that keeps shapes static under vmap), and columns without examples get
    a very low logit.
    """
    zs, zq = forward(model, params, xs), forward(model, params, xq, xs)
    columns = torch.arange(xs.shape[0], device=ys.device)
    onehot = (ys.unsqueeze(1) == columns).to(zs.dtype)  # [support, columns]; one_hot cannot be vmapped
    counts = onehot.sum(0)
    protos = (onehot.T @ zs) / counts.clamp(min=1).unsqueeze(1)
    dist = (zq.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
    return torch.where(counts > 0, -dist, torch.full_like(dist, _ABSENT))


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    def task_loss(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        loss = F.cross_entropy(predict(model, p, xs, ys, xq), yq)
        return loss, loss

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        g, loss = grad(task_loss, has_aux=True)(p, xs, ys, xq, yq)
        return g, loss, loss  # nothing is adapted: the loss before is the loss after

    return mean_over_tasks(per_task, params, batch, vectorize=inner.vectorize)


def adapt(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int, lr: float
) -> Params:
    """Nothing to adapt: prototypes come from the support set in `predict`."""
    return params


def adapt_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *,
               steps: int, lr: float) -> list[Params]:
    return [params]


def check(run) -> None:  # type: ignore[no-untyped-def]
    if not is_classification(run.task):
        raise ValueError(f"--algorithm protonet: needs a classification task (gaussian, omniglot); "
                         f"{run.task!r} is regression")


ALGORITHM = Algorithm(
    name="protonet",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1e-3,
    adapt=adapt,
    predict=predict,
    check=check,
    adapt_path=adapt_path,
    adapts=False,
)
