"""Shared pieces of the metric-based algorithms (Matching Networks, Relation Networks).

Like ProtoNets they have no inner loop and no classification head: the model is an encoder
f_theta: x -> R^d, and a query is classified by comparing its embedding with the support
set's. Their comparison modules (Matching Nets' LSTMs, Relation Nets' relation module) are
extra meta-parameters named "meta.<...>", created here from the run's seed and the encoder's
output size, and broadcast, aggregated, checkpointed and exported with theta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad

from fedmeta.common.algorithms.base import ClientUpdate, InnerConfig, Params, RunConfig
from fedmeta.common.algorithms.inner import mean_over_tasks
from fedmeta.common.models import MAX_PARAMETERS
from fedmeta.common.tasks import is_classification

ABSENT = -1e4  # logit of a label with no support example (labels are dense, so only padding)
_SALT = 0x6D657472  # separates the extra modules' initial values from the model's (same seed)


def label_columns(ys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One-hot [support, columns] of the support labels, with as many columns as support examples.

    An upper bound on the classes that keeps shapes static under vmap; columns without an
    example are padding (`counts == 0`). one_hot cannot be vmapped, a comparison can.
    """
    columns = torch.arange(ys.shape[0], device=ys.device)
    return (ys.unsqueeze(1) == columns).to(dtype)


def embedding_size(run: RunConfig, params: Params) -> int:
    """d, the encoder's output size: the zoo spec's ("out_features" of mlp, "ways" of conv4), else the
    first dimension of the model's last parameter (its output layer's bias)."""
    kwargs = run.model.kwargs
    key = {"mlp": "out_features", "conv4": "ways"}.get(run.model.name)
    if key is not None and isinstance(kwargs.get(key), int):
        return int(kwargs[key])
    last = list(params.values())[-1]
    return int(last.shape[0])


def seeded_modules(run: RunConfig, prefix: str, build: Callable[[], dict[str, nn.Module]]) -> Params:
    """The parameters of modules built under the run's seed, named prefix + "<module>.<parameter>".

    torch's default initialisations (nn.Linear, nn.LSTM) under their own seed, the caller's
    random state left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed ^ _SALT)
        modules = build()
    return {f"{prefix}{name}.{k}": v.detach().clone() for name, m in modules.items()
            for k, v in m.named_parameters()}


def check_metric(name: str, flag: str, extra_count: Callable[[int, RunConfig], int]) -> Callable[[RunConfig], None]:
    """The algorithm's check: a classification task, and extra modules of at most MAX_PARAMETERS values.

    The run configuration comes over the wire: without the bound, a zoo encoder with a huge
    output size (conv4 "ways" up to 100,000) would make a client allocate d^2-sized LSTMs.
    `extra_count(d, run)` is the extras' parameter count for an encoder of output size d.
    """
    def check(run: RunConfig) -> None:
        if not is_classification(run.task):
            raise ValueError(f"--algorithm {name}: needs a classification task (gaussian, omniglot); "
                             f"{run.task!r} is regression")
        key = {"mlp": "out_features", "conv4": "ways"}.get(run.model.name)
        d = run.model.kwargs.get(key) if key is not None else None
        if isinstance(d, int) and (count := extra_count(d, run)) > MAX_PARAMETERS:
            raise ValueError(f"{flag}: an encoder of {d} outputs makes the {name} modules {count:,} parameters; "
                             f"at most {MAX_PARAMETERS:,} are allowed")
    return check


EpisodeLoss = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def episodic_update(episode_loss: EpisodeLoss, params: Params, batch: object, inner: InnerConfig) -> ClientUpdate:
    """The mean over the batch's tasks of ∇ episode_loss(θ; support, query): a metric algorithm
    adapts nothing, so its loss before adaptation is its loss after."""

    def task_loss(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        loss = episode_loss(p, xs, ys, xq, yq)
        return loss, loss

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        g, loss = grad(task_loss, has_aux=True)(p, xs, ys, xq, yq)
        return g, loss, loss

    return mean_over_tasks(per_task, params, batch, vectorize=inner.vectorize)  # type: ignore[arg-type]
