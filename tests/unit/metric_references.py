"""Plain-autograd references for the metric-based algorithms of the contract suite (Matching and Relation Nets).

Written independently of common/algorithms: explicit cosine similarities and softmax, the
full-context embeddings with torch's own nn.LSTM (bidirectional) and nn.LSTMCell run on the
meta-parameters, explicit concatenation + MLP + sigmoid + MSE, Python loops over classes and
queries, torch.autograd.grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from fedmeta.common.config import RunConfig
from fedmeta.common.tasks import TaskBatch

Params = dict[str, torch.Tensor]
Result = tuple[Params, float, float]
Mlp = Callable[[Params, torch.Tensor], torch.Tensor]


def _sub(w: Params, prefix: str) -> Params:
    return {k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)}


def fce_support(w: Params, zs: torch.Tensor) -> torch.Tensor:
    """g(x_i, S) = g'(x_i) + h_i(forward) + h_i(backward), torch's bidirectional LSTM over the support set."""
    d = zs.shape[1]
    lstm = torch.nn.LSTM(d, d, bidirectional=True).to(zs.dtype)
    out, _ = functional_call(lstm, _sub(w, "meta.fce.g."), (zs.unsqueeze(1),))  # [n, 1, 2d]
    return zs + out[:, 0, :d] + out[:, 0, d:]


def fce_queries(run: RunConfig, w: Params, zq: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Vinyals et al. 2016, appendix: K steps of h^, c = LSTM([f', r], (h, c)), h = h^ + f', r the attention readout."""
    d = zq.shape[1]
    cell = torch.nn.LSTMCell(2 * d, d).to(zq.dtype)
    params = _sub(w, "meta.fce.f.")
    outputs = []
    for q in range(zq.shape[0]):  # each query on its own
        f = zq[q : q + 1]
        h, c = torch.zeros_like(f), torch.zeros_like(f)
        for _ in range(run.matching_steps):
            e = torch.exp(h @ gs.T)
            readout = (e / e.sum()) @ gs
            h_hat, c = functional_call(cell, params, (torch.cat([f, readout], 1), (h, c)))
            h = h_hat + f
        outputs.append(h[0])
    return torch.stack(outputs)


def matching_logits(mlp: Mlp, run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor,
                    xq: torch.Tensor) -> torch.Tensor:
    """log P(k | x^, S) = log sum_{i: y_i = k} softmax_i cos(f(x^), g(x_i)), k = 0..ways-1."""
    zs, zq = mlp(w, xs), mlp(w, xq)
    if run.matching_fce:
        zs = fce_support(w, zs)
        zq = fce_queries(run, w, zq, zs)
    rows = []
    for q in range(zq.shape[0]):
        cos = torch.stack([(zq[q] * zs[i]).sum() / (zq[q].norm() * zs[i].norm()) for i in range(zs.shape[0])])
        attention = torch.exp(cos) / torch.exp(cos).sum()
        rows.append(torch.stack([torch.log(attention[ys == k].sum()) for k in range(run.ways)]))
    return torch.stack(rows)


def relation_outputs(mlp: Mlp, run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor,
                     xq: torch.Tensor) -> torch.Tensor:
    """r_qk = W1 relu(norm(W0 [c_k ; f(x_q)] + b0)) + b1, c_k the sum (or mean) of class k's support embeddings;
    norm: gamma (u - mean) / sqrt(var + 1e-5) + beta, mean and variance over every (class, support example) pair."""
    zs, zq = mlp(w, xs), mlp(w, xq)
    pool = (lambda z: z.sum(0)) if run.relation_pool == "sum" else (lambda z: z.mean(0))
    classes = [pool(zs[ys == k]) for k in range(run.ways)]

    def pre(z: torch.Tensor, k: int) -> torch.Tensor:
        return w["meta.relation.0.weight"] @ torch.cat([classes[k], z]) + w["meta.relation.0.bias"]

    if run.relation_norm:
        support_pairs = torch.stack([pre(zs[i], k) for i in range(zs.shape[0]) for k in range(run.ways)])
        mean = support_pairs.mean(0)
        var = ((support_pairs - mean) ** 2).mean(0)
    rows = []
    for q in range(zq.shape[0]):
        scores = []
        for k in range(run.ways):
            u = pre(zq[q], k)
            if run.relation_norm:
                u = w["meta.relation.norm.weight"] * (u - mean) / torch.sqrt(var + 1e-5) + w["meta.relation.norm.bias"]
            hidden = torch.relu(u)
            scores.append((w["meta.relation.1.weight"] @ hidden + w["meta.relation.1.bias"])[0])
        rows.append(torch.stack(scores))
    return torch.stack(rows)


def relation_logits(mlp: Mlp, run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor,
                    xq: torch.Tensor) -> torch.Tensor:
    """log sigmoid(r) under --relation-loss mse, r under ce."""
    r = relation_outputs(mlp, run, w, xs, ys, xq)
    return torch.log(1 / (1 + torch.exp(-r))) if run.relation_loss == "mse" else r


def relation_loss(mlp: Mlp, run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                  yq: torch.Tensor) -> torch.Tensor:
    """Sung et al. 2018: mean (sigmoid(r_qk) - 1[y_q = k])^2; or -log softmax_k(r)_{y_q}."""
    r = relation_outputs(mlp, run, w, xs, ys, xq)
    if run.relation_loss == "ce":
        return -(r.gather(1, yq.unsqueeze(1)).squeeze(1) - torch.log(torch.exp(r).sum(1))).mean()
    target = torch.stack([(yq == k).to(r.dtype) for k in range(run.ways)], 1)
    return ((1 / (1 + torch.exp(-r)) - target) ** 2).mean()


Reference = Callable[[RunConfig, Params, TaskBatch, int], Result]


def episodic_reference(mlp: Mlp, loss: Callable[..., torch.Tensor]) -> Reference:
    """mean_t grad_(theta, extras) of the episode loss; nothing adapts, so loss_pre = loss_post."""
    def reference(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
        out, losses = [], []
        for t in range(batch.num_tasks):
            xs, ys, xq, yq = batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t]
            w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            value = loss(mlp, run, w, xs, ys, xq, yq)
            out.append(dict(zip(w, torch.autograd.grad(value, list(w.values())))))
            losses.append(value.detach())
        tensors = {k: torch.stack([o[k] for o in out]).mean(0) for k in out[0]}
        mean = float(torch.stack(losses).mean())
        return tensors, mean, mean
    return reference


def matching_loss(mlp: Mlp, run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                  yq: torch.Tensor) -> torch.Tensor:
    """-mean_q log P(y_q | x^_q, S)."""
    logp = matching_logits(mlp, run, w, xs, ys, xq)
    return -logp.gather(1, yq.unsqueeze(1)).mean()
