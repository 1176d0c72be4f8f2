"""Relation networks (Sung et al. 2018, "Learning to compare").

No inner loop: the model is the embedding module f_theta: x -> R^d; the relation module
g_phi scores a (class, query) pair:

    c_k    = sum_{i: y_i = k} f(x_i)          (--relation-pool sum, the paper's; or mean)
    u_qk   = W1 [c_k; f(x_q)] + b1
    r_qk   = W2 relu(gamma * (u_qk - mu_S) / sqrt(var_S + eps) + beta) + b2,     s_qk = sigmoid(r_qk)
    loss   = mean_{q, k} (s_qk - 1[y_q = k])^2                         (--relation-loss mse, the paper's)
          or cross-entropy of softmax_k r_qk                           (--relation-loss ce)

g_phi is an MLP 2d -> --relation-hidden (8, the paper's) -> 1 over flat embeddings (the paper's
few-shot relation module is two conv blocks over 64x5x5 feature maps, then that MLP; Conv4 here
pools to 1x1 at 28x28). Its hidden layer is batch-normalised, as the paper's conv blocks are, but
inductively: mu_S, var_S are each hidden unit's mean and variance over the task's support pairs
(c_k, f(x_i)) for every class k and support example i, never over queries (as Conv4's "support"
norm). Without it (--no-relation-norm) u_qk feeds the ReLU directly, and on the Gaussian tasks
the module settles in a query-independent score (r_qk = a(c_k) + b(x_q), accuracy exactly chance):
the paper relies on its batch norm there. Both modules are meta-parameters: phi is
"meta.relation.{0,1}.{weight,bias}" and "meta.relation.norm.{weight,bias}" (gamma, beta).
The client sends the gradient of the loss (mean over tasks); the server steps with Adam.
`predict` returns log s_qk under mse (a softmax of it is the scores normalised over classes) and
r_qk under ce; a query's prediction depends on itself and the support set only. Classification only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, Params, RunConfig, UpdateKind
from fedmeta.common.algorithms.inner import EXTRA, forward
from fedmeta.common.algorithms.maml import make_outer
from fedmeta.common.algorithms.metric import ABSENT, check_metric, episodic_update, embedding_size, label_columns, seeded_modules
from fedmeta.common.algorithms.protonet import adapt, adapt_path
from fedmeta.common.settings import option
from fedmeta.common.tasks import LossFn, TaskBatch

RELATION = EXTRA + "relation."
LOSSES, POOLS = ("mse", "ce"), ("sum", "mean")
_EPS = 1e-5  # batch norm's
LOSS = option("relation_loss", "mse", "relationnet: mse (sigmoid scores against one-hot targets, Sung et al. "
              "2018) or ce (softmax cross-entropy over the relation scores)", choices=LOSSES, resume=True)
POOL = option("relation_pool", "sum", "relationnet: a class's representation from its support embeddings: sum "
              "(Sung et al. 2018) or mean", choices=POOLS, resume=True)
NORM = option("relation_norm", True, "relationnet: no normalisation of the relation module's hidden layer "
              "(by the statistics of the task's support pairs)", invert=True, resume=True)
HIDDEN = option("relation_hidden", 8, "relationnet: hidden units of the relation module (Sung et al. 2018: 8)",
                minimum=1, maximum=4096, resume=True)


def extra_parameters(params: Params, run: RunConfig) -> Params:
    """phi: Linear(2d, hidden), [its norm's gamma = 1, beta = 0,] Linear(hidden, 1), torch's default
    initialisations seeded by the run."""
    d, h = embedding_size(run, params), run.relation_hidden

    def modules() -> dict[str, nn.Module]:
        return {"0": nn.Linear(2 * d, h), **({"norm": nn.BatchNorm1d(h)} if run.relation_norm else {}),
                "1": nn.Linear(h, 1)}

    return seeded_modules(run, RELATION, modules)


def relation_scores(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *,
                    pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [queries, columns], present [columns]): the relation module's output for every (query, label)
    pair, one column per support example (static shapes under vmap), and which columns hold a class."""
    zs, zq = forward(model, params, xs), forward(model, params, xq, xs)
    onehot = label_columns(ys, zs.dtype)
    counts = onehot.sum(0)
    classes = onehot.T @ zs  # [columns, d]
    if pool == "mean":
        classes = classes / counts.clamp(min=1).unsqueeze(1)
    w1, d = params[RELATION + "0.weight"], zs.shape[1]
    by_class = classes @ w1[:, :d].T  # W1 [c; z] = W1[:, :d] c + W1[:, d:] z: each half once per class / example

    def pre(z: torch.Tensor) -> torch.Tensor:  # u [examples, columns, hidden]
        return by_class.unsqueeze(0) + (z @ w1[:, d:].T).unsqueeze(1) + params[RELATION + "0.bias"]

    u, present = pre(zq), counts > 0
    if RELATION + "norm.weight" in params:  # statistics of the support pairs of present classes only
        us, mask = pre(zs), present.to(zs.dtype).view(1, -1, 1)
        n = mask.sum() * zs.shape[0]
        mean = (us * mask).sum((0, 1)) / n
        var = ((us - mean).pow(2) * mask).sum((0, 1)) / n
        u = (u - mean) * torch.rsqrt(var + _EPS) * params[RELATION + "norm.weight"] + params[RELATION + "norm.bias"]
    r = (torch.relu(u) @ params[RELATION + "1.weight"].T).squeeze(-1) + params[RELATION + "1.bias"]
    return r, present


def predict(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *,
            pool: str = POOL.field_default, loss: str = LOSS.field_default) -> torch.Tensor:
    """Logits [queries, columns]: log sigmoid(r) (mse) or r (ce); columns without a class very low."""
    r, present = relation_scores(model, params, xs, ys, xq, pool=pool)
    logits = F.logsigmoid(r) if loss == "mse" else r
    return torch.where(present, logits, torch.full_like(logits, ABSENT))


def episode_loss(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                 yq: torch.Tensor, *, pool: str, loss: str) -> torch.Tensor:
    """mean over queries and present classes of (sigmoid(r) - onehot)^2, or the cross-entropy of r."""
    r, present = relation_scores(model, params, xs, ys, xq, pool=pool)
    if loss == "ce":
        return F.cross_entropy(torch.where(present, r, torch.full_like(r, ABSENT)), yq)
    target = (yq.unsqueeze(1) == torch.arange(r.shape[1], device=yq.device)).to(r.dtype)  # [queries, columns]
    mask = present.to(r.dtype)
    return ((torch.sigmoid(r) - target).pow(2) * mask).sum() / (mask.sum() * r.shape[0])


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn,
                inner: InnerConfig) -> ClientUpdate:
    pool, loss_name = inner.option(POOL), inner.option(LOSS)
    return episodic_update(lambda p, xs, ys, xq, yq: episode_loss(model, p, xs, ys, xq, yq, pool=pool, loss=loss_name),
                           params, batch, inner)


def bind(options: Mapping[str, Any]) -> Algorithm:
    """The algorithm whose `predict` takes the run's --relation-pool and --relation-loss."""
    values = {}
    for setting, allowed in ((POOL, POOLS), (LOSS, LOSSES)):
        value = options.get(setting.field or setting.name, setting.field_default)
        if value not in allowed:
            raise ValueError(f"{setting.flag}: expected one of {', '.join(allowed)}, got {value!r}")
        values[setting.field or setting.name] = value
    return dataclasses.replace(ALGORITHM, predict=partial(predict, pool=values["relation_pool"],
                                                          loss=values["relation_loss"]))


ALGORITHM = Algorithm(
    name="relationnet",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1e-3,
    adapt=adapt,
    extra_parameters=extra_parameters,
    predict=predict,
    check=check_metric("relationnet", "--relation-hidden",
                       lambda d, run: 2 * d * run.relation_hidden + 4 * run.relation_hidden + 1),
    adapt_path=adapt_path,
    adapts=False,
    bind=bind,
    options=(LOSS, POOL, NORM, HIDDEN),
)
