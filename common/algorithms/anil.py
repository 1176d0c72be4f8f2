"""ANIL (Raghu et al. 2020): Almost No Inner Loop.

The inner loop adapts only the model's head (the parameters its spec names as the head:
Conv4's `head.*`, an MLP's last layer); the body's features are computed once per task
and reused by every inner step. The meta-gradient, second order through the head's
adaptation, covers all parameters. Server: Adam, as MAML.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from fedmeta.common.algorithms.base import Params
from fedmeta.common.algorithms.inner import inner_path, sgd_path
from fedmeta.common.algorithms.maml import meta_algorithm
from fedmeta.common.models import MLP, head_parameters
from fedmeta.common.tasks import LossFn

Body = Callable[[Params, torch.Tensor], torch.Tensor]


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def split(model: nn.Module) -> tuple[Body, nn.Module, str] | None:
    """(body features, head module, head parameter prefix) for models ANIL can split, else None."""
    if isinstance(model, MLP):
        n = len(model.net) - 1
        body_net = model.net[:n]

        def mlp_body(p: Params, x: torch.Tensor) -> torch.Tensor:
            body = {k: v for k, v in _sub(p, "net.").items() if not k.startswith(f"{n}.")}
            return functional_call(body_net, body, (x.flatten(1) if x.dim() > 2 else x,))

        return mlp_body, model.net[n], f"net.{n}."
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if isinstance(features, nn.Module) and isinstance(head, nn.Module):
        def conv_body(p: Params, x: torch.Tensor) -> torch.Tensor:
            return functional_call(features, _sub(p, "features."), (x,)).flatten(1)

        return conv_body, head, "head."
    return None


def adapt(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, steps: int, lr: float
) -> Params:
    """SGD on the head only, `steps` times, on features computed once."""
    parts = split(model)
    names = head_parameters(model)
    if parts is None:  # a model ANIL cannot split: full forward passes, head-only gradients
        return inner_path(model, params, x, y, loss_fn, steps=steps, lr=lr, only=names)
    body, head_module, prefix = parts
    feats = body(params, x)

    def head_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(head_module, _sub({k: p[k] for k in names}, prefix), (feats,)), y)

    return sgd_path(head_loss, params, steps=steps, lr=lr, only=names)


ALGORITHM = meta_algorithm("anil", adapt_fn=adapt, head_only=True)
