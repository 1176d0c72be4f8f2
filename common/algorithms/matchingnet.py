"""Matching networks (Vinyals et al. 2016).

No inner loop: the model is an encoder. A query x^ is labelled by attention over the
support set S = {(x_i, y_i)}:

    P(y = k | x^, S) = sum_{i: y_i = k} a(x^, x_i),    a(x^, x_i) = softmax_i cos(f(x^, S), g(x_i, S))

Plain form: f = g = the encoder. Full-context embeddings (--matching-fce, the paper's
appendix), with f' = g' = the encoder:

    g(x_i, S) = g'(x_i) + h_i(fw) + h_i(bw)        a bidirectional LSTM over g'(x_1..n), hidden d
    f(x^, S)  = h_K, for k = 1..K (--matching-steps):
        r_{k-1}      = sum_i softmax_i(h_{k-1} . g(x_i, S)) g(x_i, S)
        h^_k, c_k    = LSTM(input [f'(x^), r_{k-1}], state (h_{k-1}, c_{k-1}))
        h_k          = h^_k + f'(x^)                          h_0 = c_0 = 0

(the paper's LSTM(f'(x^), [h_{k-1}, r_{k-1}], c_{k-1}) with the readout moved from the state to
the input: the same gates, a torch nn.LSTMCell(2d, d)). The LSTMs are meta-parameters
"meta.fce.g.*" (nn.LSTM's names, bidirectional) and "meta.fce.f.*" (nn.LSTMCell's). A query's
prediction depends on itself and the support set only: inductive. `predict` returns log P
(so cross-entropy on it is the episodic loss, -log P(y | x^, S)); the client sends the
gradient of that loss, mean over tasks, and the server steps with Adam. Classification only.
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

FCE_PREFIX = EXTRA + "fce."
MAX_STEPS = 20
FCE = option("matching_fce", False, "matchingnet: full-context embeddings (a bidirectional LSTM over the "
             "support set, an attention LSTM of --matching-steps steps for the queries)", resume=True)
STEPS = option("matching_steps", 2, "matchingnet: processing steps K of the full-context attention LSTM",
               minimum=1, maximum=MAX_STEPS, resume=True)
_TINY = 1e-30  # floor of a present class's probability before the log (never reached: cosines are bounded)


def extra_parameters(params: Params, run: RunConfig) -> Params:
    """The FCE LSTMs (torch's default initialisation, seeded by the run), or nothing for the plain form."""
    if not run.matching_fce:
        return {}
    d = embedding_size(run, params)
    return seeded_modules(run, FCE_PREFIX, lambda: {"g": nn.LSTM(d, d, bidirectional=True), "f": nn.LSTMCell(2 * d, d)})


def fce_parameters(d: int) -> int:
    """Parameter count of the FCE LSTMs for embeddings of size d: 2 x LSTM(d, d) + LSTMCell(2d, d)."""
    return 2 * (8 * d * d + 8 * d) + (12 * d * d + 8 * d)


def _cell(params: Params, name: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
          suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, torch's gate order (i, f, g, o) and parameter names (`suffix`: "_l0", "_l0_reverse")."""
    p = FCE_PREFIX + name + "."
    gates = (x @ params[p + "weight_ih" + suffix].T + params[p + "bias_ih" + suffix]
             + h @ params[p + "weight_hh" + suffix].T + params[p + "bias_hh" + suffix])
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def context_support(params: Params, zs: torch.Tensor) -> torch.Tensor:
    """g(x_i, S) = g'(x_i) + forward + backward LSTM states over the support embeddings zs [n, d]."""
    n = zs.shape[0]
    out = zs
    for suffix, order in (("_l0", range(n)), ("_l0_reverse", range(n - 1, -1, -1))):
        h = c = torch.zeros_like(zs[0])
        states: list[torch.Tensor] = [zs[0]] * n
        for i in order:
            h, c = _cell(params, "g", zs[i], h, c, suffix)
            states[i] = h
        out = out + torch.stack(states)
    return out


def context_queries(params: Params, zq: torch.Tensor, gs: torch.Tensor, steps: int) -> torch.Tensor:
    """f(x^, S) = h_K of the attention LSTM, for each query embedding zq [q, d] independently."""
    h = c = torch.zeros_like(zq)
    for _ in range(steps):
        readout = torch.softmax(h @ gs.T, -1) @ gs
        h_hat, c = _cell(params, "f", torch.cat([zq, readout], -1), h, c)
        h = h_hat + zq
    return h


def predict(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *,
            steps: int = STEPS.field_default) -> torch.Tensor:
    """log P(k | xq, S) [queries, columns]: columns index labels, one per support example (static
    shapes under vmap); columns without an example get a very low logit. FCE when the parameters
    hold its LSTMs, with `steps` processing steps."""
    zs, zq = forward(model, params, xs), forward(model, params, xq, xs)
    if FCE_PREFIX + "f.weight_ih" in params:
        zs = context_support(params, zs)
        zq = context_queries(params, zq, zs, steps)
    attention = torch.softmax(F.normalize(zq, dim=-1) @ F.normalize(zs, dim=-1).T, -1)  # [q, n]
    onehot = label_columns(ys, zs.dtype)
    probs = attention @ onehot
    return torch.where(onehot.sum(0) > 0, probs.clamp(min=_TINY).log(), torch.full_like(probs, ABSENT))


def client_step(model: nn.Module, params: Params, batch: TaskBatch, loss_fn: LossFn,
                inner: InnerConfig) -> ClientUpdate:
    steps = inner.option(STEPS)
    return episodic_update(lambda p, xs, ys, xq, yq: F.cross_entropy(predict(model, p, xs, ys, xq, steps=steps), yq),
                           params, batch, inner)


def bind(options: Mapping[str, Any]) -> Algorithm:
    """The algorithm whose `predict` takes the run's --matching-steps (from a RunConfig or model.json's "run")."""
    steps = options.get(STEPS.field or STEPS.name, STEPS.field_default)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--matching-steps: expected an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return dataclasses.replace(ALGORITHM, predict=partial(predict, steps=steps))


ALGORITHM = Algorithm(
    name="matchingnet",
    update_kind=UpdateKind.META_GRADIENT,
    client_step=client_step,
    make_outer=make_outer,
    default_outer_lr=1e-3,
    adapt=adapt,
    extra_parameters=extra_parameters,
    predict=predict,
    check=check_metric("matchingnet", "--matching-fce", lambda d, run: fce_parameters(d) if run.matching_fce else 0),
    adapt_path=adapt_path,
    adapts=False,
    bind=bind,
    options=(FCE, STEPS),
)
