"""Meta-SGD (Li et al. 2017): MAML with a learned per-parameter inner step size.

Meta-parameters are (theta, alpha), alpha of theta's shape, named "meta.lr.<name>" and
initialised to --inner-lr. Inner loop: theta' = theta - alpha * grad L_support(theta)
(elementwise). The client sends the second-order meta-gradient for both theta and alpha;
the server steps both with Adam; alpha is exported with theta and used by `adapt`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common.algorithms.base import Params
from fedmeta.common.algorithms.inner import EXTRA, inner_path, model_part
from fedmeta.common.algorithms.maml import meta_algorithm
from fedmeta.common.tasks import LossFn

ALPHA = EXTRA + "lr."


def extra_parameters(params: Params, run) -> Params:  # type: ignore[no-untyped-def]
    return {ALPHA + k: torch.full_like(v, run.inner_lr) for k, v in params.items()}


def adapt(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int, lr: float
) -> Params:
    """theta' = theta - alpha * grad, `steps` times; `lr` is unused (alpha is learned)."""
    alpha = {k: params[ALPHA + k] for k in model_part(params)}
    return inner_path(model, params, x, y, loss_fn, steps=steps, lr=alpha)


ALGORITHM = meta_algorithm("metasgd", adapt_fn=adapt, extra_parameters=extra_parameters, learned_steps=True)
