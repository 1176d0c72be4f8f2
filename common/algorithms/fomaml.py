"""First-order MAML (Finn et al. 2017, section 5.2).

Per task: theta' = SGD^k(theta; support), and the client sends the weighted mean
over tasks of grad_{theta'} L_query(theta'): the meta-gradient with the inner
loop's Jacobian replaced by the identity. Server: Adam, as MAML.
"""

from __future__ import annotations

from torch import nn

from common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, Params, UpdateKind
from common.algorithms.maml import adapt, make_outer, meta_gradient
from common.tasks import LossFn, TaskBatch


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn, inner: InnerConfig) -> ClientUpdate:
    return meta_gradient(model, params, batch, loss_fn, inner, first_order=True)


ALGORITHM = Algorithm(
    name="fomaml",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=3e-3,
    adapt=adapt,
)
