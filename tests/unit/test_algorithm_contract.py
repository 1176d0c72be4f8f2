"""The contract every algorithm meets, over one table of cases: adding a row is all it takes to test one.

Each row names an algorithm, the settings to test it with, and references written here,
independently of common/algorithms: explicit Python loops over tasks and steps, an MLP
written out layer by layer, and torch.autograd.grad (create_graph=True where the
algorithm is second order). The suite checks, for every row: update names, shapes and
kind; seeded determinism; agreement with the reference in float64 (vmap and loop) and
float32; adapt / predict against a reference adaptation; evaluate; hyperparameters that
are refused with a message naming the flag; and one centralised step against a hand loop.
tests/integration/test_algorithm_family.py runs the same table through real federations.
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.algorithms import ALGORITHMS, InnerConfig, OuterConfig, UpdateKind, configured, meta_parameters
from fedmeta.common.centralized import train
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import evaluate
from fedmeta.common.models import ENCODERS, ModelSpec, build_model
from fedmeta.common.tasks import STREAM_TRAIN, TaskBatch, is_classification, loss_for, make_tasks, task_seed
from fedmeta.server.config import build
from tests.unit import metric_references as metric

Params = dict[str, torch.Tensor]
META = "meta."

# ---- a functional MLP, written out (the references share nothing with common/algorithms) ----------


def model_names(params: Params) -> list[str]:
    return [k for k in params if not k.startswith(META)]


def mlp(w: Params, x: torch.Tensor) -> torch.Tensor:
    """Linear, ReLU, ..., Linear over the "<layer>.weight" / "<layer>.bias" entries, in order."""
    layers = [k.removesuffix("weight") for k in model_names(w) if k.endswith(".weight")]
    h = x
    for i, layer in enumerate(layers):
        h = h @ w[layer + "weight"].T + w[layer + "bias"]
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def model_part_of(params: Params) -> Params:
    return {k: v for k, v in params.items() if not k.startswith(META)}


def head_names(w: Params) -> list[str]:
    """The last layer's weight and bias (ANIL's head)."""
    last = model_names(w)[-1].rpartition(".")[0]
    return [k for k in model_names(w) if k.rpartition(".")[0] == last]


def body(w: Params, x: torch.Tensor) -> torch.Tensor:
    """Every layer but the last, with the ReLU that feeds the head."""
    head = set(head_names(w))
    return torch.relu(mlp({k: v for k, v in w.items() if k not in head and not k.startswith(META)}, x))


def head(w: Params, feats: torch.Tensor) -> torch.Tensor:
    weight, bias = head_names(w)
    return feats @ w[weight].T + w[bias]


def task_loss(run: RunConfig, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error, or cross-entropy written as minus the mean log-softmax of the label."""
    if is_classification(run.task):
        return -torch.log_softmax(out, -1).gather(1, y.unsqueeze(1)).mean()
    return ((out - y) ** 2).mean()


def loss(run: RunConfig, w: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return task_loss(run, mlp(w, x), y)


def leaves(params: Params) -> Params:
    """Fresh leaves holding the values, for one task's graph."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def grads(value: torch.Tensor, w: Params, *, create_graph: bool = False) -> Params:
    return dict(zip(w, torch.autograd.grad(value, list(w.values()), create_graph=create_graph)))


def sgd(run: RunConfig, w: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
        create_graph: bool = False) -> Params:
    for _ in range(steps):
        g = grads(loss(run, w, x, y), w, create_graph=create_graph)
        w = {k: w[k] - lr * g[k] for k in w}
    return w


def task(batch: TaskBatch, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t]


Result = tuple[Params, float, float]  # (update tensors by name, loss_pre, loss_post)


def mean_over_tasks(per_task: list[Params], pre: list[torch.Tensor], post: list[torch.Tensor]) -> Result:
    tensors = {k: torch.stack([p[k] for p in per_task]).mean(0).detach() for k in per_task[0]}
    return tensors, float(torch.stack(pre).mean()), float(torch.stack(post).mean())


# ---- the references: client steps --------------------------------------------------------------


def ref_maml(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """mean_t grad_theta L_q,t(SGD^k(theta; support_t)), second order (Finn et al. 2017)."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        theta = leaves(params)
        adapted = sgd(run, theta, xs, ys, steps=run.inner_steps, lr=run.inner_lr, create_graph=True)
        lq = loss(run, adapted, xq, yq)
        out.append(grads(lq, theta))
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(lq.detach())
    return mean_over_tasks(out, pre, post)


def ref_fomaml(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """mean_t grad_{theta'} L_q,t(theta'), the inner loop's Jacobian taken as the identity."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        adapted = leaves(sgd(run, leaves(params), xs, ys, steps=run.inner_steps, lr=run.inner_lr))
        lq = loss(run, adapted, xq, yq)
        out.append(grads(lq, adapted))
        pre.append(loss(run, params, xq, yq).detach())
        post.append(lq.detach())
    return mean_over_tasks(out, pre, post)


def ref_reptile(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """mean_t (SGD^k(theta; support_t ++ query_t) - theta) (Nichol et al. 2018)."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        theta = leaves(params)
        adapted = sgd(run, theta, torch.cat([xs, xq]), torch.cat([ys, yq]), steps=run.inner_steps, lr=run.inner_lr)
        out.append({k: adapted[k] - theta[k] for k in theta})
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(loss(run, adapted, xq, yq).detach())
    return mean_over_tasks(out, pre, post)


def ref_metasgd(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """Second-order meta-gradient for (theta, alpha), theta' = theta - alpha * grad (Li et al. 2017)."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        everything = leaves(params)
        theta = {k: everything[k] for k in model_names(params)}
        w = theta
        for _ in range(run.inner_steps):
            g = grads(loss(run, w, xs, ys), w, create_graph=True)
            w = {k: w[k] - everything[f"meta.lr.{k}"] * g[k] for k in w}
        lq = loss(run, w, xq, yq)
        out.append(grads(lq, everything))
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(lq.detach())
    return mean_over_tasks(out, pre, post)


def ref_anil(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """MAML with the inner loop on the head only; second order through the head's adaptation (Raghu et al. 2020)."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        theta = leaves(params)
        h = {k: theta[k] for k in head_names(theta)}
        feats = body(theta, xs)
        for _ in range(run.inner_steps):
            g = grads(task_loss(run, head(h, feats), ys), h, create_graph=True)
            h = {k: h[k] - run.inner_lr * g[k] for k in h}
        lq = task_loss(run, head(h, body(theta, xq)), yq)
        out.append(grads(lq, theta))
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(lq.detach())
    return mean_over_tasks(out, pre, post)


def curvature_names(name: str, w: Params) -> list[str]:
    """Meta-Curvature's matrices of tensor `name`, by mode (out, in) or its diagonal, as they are in w."""
    return [f"meta.mc.{m}.{name}" for m in ("diag", "out", "in") if f"meta.mc.{m}.{name}" in w]


def curved(everything: Params, name: str, g: torch.Tensor) -> torch.Tensor:
    """vec(G') = (M_out kron M_in) vec(G) (row-major vec) for a weight, M g or m * g for a bias."""
    factors = [everything[n] for n in curvature_names(name, everything)]
    if "meta.mc.diag." + name in everything:
        return factors[0] * g
    matrix = factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])
    return (matrix @ g.reshape(-1)).reshape(g.shape)


def ref_metacurvature(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """theta' = theta - lr * M grad, M the Kronecker product of learned factors; the meta-gradient for
    theta and every factor, second order unless --curvature-first-order (Park & Oliva 2019)."""
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        everything = leaves(params)
        theta = {k: everything[k] for k in model_names(params)}
        w = theta
        for _ in range(run.inner_steps):
            g = grads(loss(run, w, xs, ys), w, create_graph=not run.curvature_first_order)
            w = {k: w[k] - run.inner_lr * curved(everything, k, g[k]) for k in w}
        lq = loss(run, w, xq, yq)
        out.append(grads(lq, everything))
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(lq.detach())
    return mean_over_tasks(out, pre, post)


def ref_msl_weights(steps: int, round_index: int, rounds: int, enabled: bool) -> list[float]:
    """Antoniou et al. 2019's per-step loss importance, annealed over the first tenth of the run.

    Their get_per_step_loss_importance_vector with multi_step_loss_num_epochs = ceil(rounds / 10).
    """
    if not enabled or steps == 1:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / max(1, math.ceil(rounds / 10))
    floor = 0.03 / steps
    weights = [max(1.0 / steps - round_index * decay, floor) for _ in range(steps - 1)]
    return weights + [min(1.0 / steps + round_index * (steps - 1) * decay, 1.0 - (steps - 1) * floor)]


def lslr_name(step: int, name: str) -> str:
    return f"meta.lslr.{step}.{name}"


def ref_mamlpp(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """Multi-step loss, per-step per-layer rates, first order before --first-order-rounds (Antoniou et al. 2019)."""
    steps = max(1, run.inner_steps)
    weights = ref_msl_weights(steps, round_index, run.rounds, run.msl)
    second_order = round_index >= run.first_order_rounds
    out, pre, post = [], [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        everything = leaves(params)
        theta = {k: everything[k] for k in model_names(params)}
        w, losses = theta, []
        for j in range(steps):
            # First order: the inner gradients are constants, the rates and theta's path are not.
            g = grads(loss(run, w, xs, ys), w, create_graph=second_order)
            w = {k: w[k] - (everything[lslr_name(j, k)] if run.lslr else run.inner_lr) * g[k] for k in w}
            losses.append(loss(run, w, xq, yq))
        total = sum(wj * lj for wj, lj in zip(weights, losses))
        out.append(grads(total, everything))
        pre.append(loss(run, theta, xq, yq).detach())
        post.append(losses[-1].detach())
    return mean_over_tasks(out, pre, post)


def ref_perfedavg(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """Fallah et al. 2020, Algorithm 1: tau local steps on F(w) = L(w - alpha grad L(w, D), D').

    fo: w <- w - beta grad L(w~, D'); hf: w <- w - beta (I - alpha H(w, D)) grad L(w~, D'), the
    Hessian-vector product by double backward. Task t = step mod tasks; D its support, D' its query.
    """
    alpha, beta = run.inner_lr, run.local_lr
    w = {k: v.detach().clone() for k, v in params.items()}
    for step in range(run.local_steps):
        xs, ys, xq, yq = task(batch, step % batch.num_tasks)
        w = leaves(w)
        g_support = grads(loss(run, w, xs, ys), w, create_graph=run.perfedavg_variant == "hf")
        w_tilde = leaves({k: w[k] - alpha * g_support[k] for k in w})
        g = {k: v.detach() for k, v in grads(loss(run, w_tilde, xq, yq), w_tilde).items()}
        if run.perfedavg_variant == "hf":
            dot = sum((g_support[k] * g[k]).sum() for k in w)
            hv = grads(dot, w)  # d/dw <grad L(w, D), g> = H(w, D) g
            g = {k: g[k] - alpha * hv[k] for k in g}
        w = {k: (w[k] - beta * g[k]).detach() for k in w}
    pre, post = [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        pre.append(loss(run, params, xq, yq).detach())
        post.append(loss(run, sgd(run, leaves(params), xs, ys, steps=1, lr=alpha), xq, yq).detach())
    return {k: w[k] - params[k] for k in params}, float(torch.stack(pre).mean()), float(torch.stack(post).mean())


def ref_fedavg(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    """McMahan et al. 2017: --local-steps passes of SGD, one step per task on support ++ query."""
    w = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(run.local_steps):
        for t in range(batch.num_tasks):
            xs, ys, xq, yq = task(batch, t)
            w = {k: v.detach() for k, v in sgd(run, leaves(w), torch.cat([xs, xq]), torch.cat([ys, yq]), steps=1,
                                                lr=run.local_lr).items()}
    pre = [loss(run, params, task(batch, t)[2], task(batch, t)[3]) for t in range(batch.num_tasks)]
    post = [loss(run, w, task(batch, t)[2], task(batch, t)[3]) for t in range(batch.num_tasks)]
    return {k: w[k] - params[k] for k in params}, float(torch.stack(pre).mean()), float(torch.stack(post).mean())


def prototype_logits(run: RunConfig, w: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """-||f(xq) - c_k||^2, c_k the mean embedding of class k's support examples (Snell et al. 2017)."""
    zs, zq = mlp(w, xs), mlp(w, xq)
    prototypes = torch.stack([zs[ys == k].mean(0) for k in range(run.ways)])
    return -((zq.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)


def ref_protonet(run: RunConfig, params: Params, batch: TaskBatch, round_index: int) -> Result:
    out, losses = [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        theta = leaves(params)
        lq = task_loss(run, prototype_logits(run, theta, xs, ys, xq), yq)
        out.append(grads(lq, theta))
        losses.append(lq.detach())
    return mean_over_tasks(out, losses, losses)


# ---- the references: adaptation -------------------------------------------------------------------

AdaptReference = Callable[[RunConfig, Params, torch.Tensor, torch.Tensor, int, float], Params]


def adapt_sgd(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Params:
    return {k: v.detach() for k, v in sgd(run, leaves(params), x, y, steps=steps, lr=lr).items()}


def adapt_metasgd(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Params:
    w = dict(params)
    for _ in range(steps):
        theta = leaves({k: w[k] for k in model_names(w)})
        g = grads(loss(run, theta, x, y), theta)
        w = w | {k: (w[k] - w[f"meta.lr.{k}"] * g[k]).detach() for k in g}
    return w


def adapt_anil(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Params:
    feats = body(params, x)
    h = {k: params[k] for k in head_names(params)}
    for _ in range(steps):
        h = leaves(h)
        g = grads(task_loss(run, head(h, feats), y), h)
        h = {k: (h[k] - lr * g[k]).detach() for k in h}
    return params | h


def adapt_mamlpp(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Params:
    """Per-step per-layer rates; steps past the trained ones reuse the last trained step's rates."""
    trained = max(1, run.inner_steps)
    w = dict(params)
    for j in range(steps):
        theta = leaves({k: w[k] for k in model_names(w)})
        g = grads(loss(run, theta, x, y), theta)
        rate = {k: w[lslr_name(min(j, trained - 1), k)] if run.lslr else lr for k in g}
        w = w | {k: (w[k] - rate[k] * g[k]).detach() for k in g}
    return w


def adapt_metacurvature(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                        lr: float) -> Params:
    w = dict(params)
    for _ in range(steps):
        theta = leaves({k: w[k] for k in model_names(w)})
        g = grads(loss(run, theta, x, y), theta)
        w = w | {k: (w[k] - lr * curved(w, k, g[k])).detach() for k in g}
    return w


def adapt_none(run: RunConfig, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Params:
    return dict(params)


# ---- the table ------------------------------------------------------------------------------------

# Per task family: the small model the unit tests use and the settings that suit it. The
# integration tests keep the settings but take the coordinator's default model.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "sinusoid": {"shots": 4, "queries": 5, "inner_lr": 0.05},
    "gaussian": {"ways": 3, "dim": 4, "shots": 2, "queries": 3, "inner_lr": 0.4},
}
COMMON_SETTINGS: dict[str, Any] = {"tasks_per_client": 3, "inner_steps": 2, "rounds": 20, "local_steps": 4,
                                   "local_lr": 0.05, "eval_steps": 3, "eval_tasks_per_client": 3, "eval_queries": 4}


def unit_model(task: str, algorithm: str) -> ModelSpec:
    if task == "sinusoid":
        return ModelSpec("mlp", {"in_features": 1, "hidden": [16, 16], "out_features": 1})
    dim, ways = TASK_SETTINGS["gaussian"]["dim"], TASK_SETTINGS["gaussian"]["ways"]
    out = 8 if algorithm in ENCODERS else ways  # protonet, matchingnet, relationnet: an encoder, 4 -> 8 -> 8
    return ModelSpec("mlp", {"in_features": dim, "hidden": [8], "out_features": out})


Reference = Callable[[RunConfig, Params, TaskBatch, int], Result]
PredictReference = Callable[[RunConfig, Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One row: an algorithm, the settings that select its variant, and its references."""

    algorithm: str
    kind: UpdateKind
    reference: Reference
    adapt_reference: AdaptReference
    task: str = "sinusoid"
    settings: dict[str, Any] = field(default_factory=dict)  # flags (RunConfig fields) of this variant
    round_index: int = 0  # the round the reference checks run at (MAML++'s schedules depend on it)
    # Prediction rule other than the adapted model's forward pass: (run, params, xs, ys, xq) -> logits.
    predict_reference: PredictReference | None = None
    # Settings this variant must refuse, and the flag the message names; every row also gets INVALID.
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    # Whether tests/integration/test_algorithm_family.py expects this variant to learn Gaussian tasks.
    learns: bool = True

    def flags(self) -> dict[str, Any]:
        """The coordinator's option values (server.config.build) for this row, with its task's settings."""
        return {"algorithm": self.algorithm, "task": self.task} | TASK_SETTINGS[self.task] | self.settings

    def run(self, **overrides: Any) -> RunConfig:
        """The RunConfig of the unit tests: small model, small batches."""
        values = COMMON_SETTINGS | TASK_SETTINGS[self.task] | self.settings | overrides
        # A --no-x flag (no_x: True) is the field x = False.
        values = {(k[3:] if k.startswith("no_") else k): (not v if k.startswith("no_") else v) for k, v in values.items()}
        return RunConfig(run_id="contract", algorithm=self.algorithm, task=self.task,
                         model=unit_model(self.task, self.algorithm), **values)


MG, PD = UpdateKind.META_GRADIENT, UpdateKind.PARAMETER_DELTA
CASES: dict[str, Case] = {
    "maml": Case("maml", MG, ref_maml, adapt_sgd),
    "fomaml": Case("fomaml", MG, ref_fomaml, adapt_sgd),
    "reptile": Case("reptile", PD, ref_reptile, adapt_sgd),
    "metasgd": Case("metasgd", MG, ref_metasgd, adapt_metasgd),
    "anil": Case("anil", MG, ref_anil, adapt_anil),
    # rounds 20: the multi-step loss anneals over rounds 0-2, so round 1 weighs the steps 1/4, 3/4.
    "mamlpp": Case("mamlpp", MG, ref_mamlpp, adapt_mamlpp, settings={"first_order_rounds": 1}, round_index=1,
                   invalid=(({"first_order_rounds": 2.5}, "--first-order-rounds"),)),
    "mamlpp-first-order": Case("mamlpp", MG, ref_mamlpp, adapt_mamlpp, settings={"first_order_rounds": 2},
                               round_index=1),
    "perfedavg-fo": Case("perfedavg", PD, ref_perfedavg, adapt_sgd, settings={"perfedavg_variant": "fo"},
                         invalid=(({"perfedavg_variant": "xx"}, "--perfedavg-variant"),
                                  ({"local_steps": 0}, "--local-steps"),
                                  ({"local_lr": -1.0}, "--local-lr"),
                                  ({"local_lr": 0.0}, "--local-lr"))),
    "perfedavg-hf": Case("perfedavg", PD, ref_perfedavg, adapt_sgd, settings={"perfedavg_variant": "hf"}),
    "metacurvature": Case("metacurvature", MG, ref_metacurvature, adapt_metacurvature,
                          invalid=(({"curvature_bias": "block"}, "--curvature-bias"),)),
    "metacurvature-first-order-diagonal": Case("metacurvature", MG, ref_metacurvature, adapt_metacurvature,
                                               settings={"curvature_first_order": True,
                                                         "curvature_bias": "diagonal"}),
    "protonet": Case("protonet", MG, ref_protonet, adapt_none, task="gaussian", predict_reference=prototype_logits,
                     invalid=(({"task": "sinusoid"}, "--algorithm protonet"),)),
    "matchingnet": Case("matchingnet", MG, metric.episodic_reference(mlp, metric.matching_loss), adapt_none,
                        task="gaussian", predict_reference=partial(metric.matching_logits, mlp),
                        invalid=(({"task": "sinusoid"}, "--algorithm matchingnet"),
                                 ({"matching_steps": 0}, "--matching-steps"),
                                 ({"matching_steps": 21}, "--matching-steps"))),
    "matchingnet-fce": Case("matchingnet", MG, metric.episodic_reference(mlp, metric.matching_loss), adapt_none,
                            task="gaussian", settings={"matching_fce": True, "matching_steps": 3},
                            predict_reference=partial(metric.matching_logits, mlp)),
    "relationnet": Case("relationnet", MG, metric.episodic_reference(mlp, metric.relation_loss), adapt_none,
                        task="gaussian", predict_reference=partial(metric.relation_logits, mlp),
                        invalid=(({"task": "sinusoid"}, "--algorithm relationnet"),
                                 ({"relation_loss": "l1"}, "--relation-loss"),
                                 ({"relation_pool": "max"}, "--relation-pool"),
                                 ({"relation_hidden": 0}, "--relation-hidden"))),
    "relationnet-ce-mean": Case("relationnet", MG, metric.episodic_reference(mlp, metric.relation_loss), adapt_none,
                                task="gaussian", settings={"relation_loss": "ce", "relation_pool": "mean",
                                                           "relation_hidden": 5},
                                predict_reference=partial(metric.relation_logits, mlp)),
    # Without the support-pair norm the relation module settles in a query-independent score on Gaussian
    # tasks (accuracy exactly chance after 150 rounds: see common/algorithms/relationnet.py).
    "relationnet-no-norm": Case("relationnet", MG, metric.episodic_reference(mlp, metric.relation_loss), adapt_none,
                                task="gaussian", settings={"no_relation_norm": True},
                                predict_reference=partial(metric.relation_logits, mlp), learns=False),
    "fedavg": Case("fedavg", PD, ref_fedavg, adapt_sgd,
                   invalid=(({"local_steps": 0}, "--local-steps"), ({"local_lr": -1.0}, "--local-lr"))),
}
NAMES = sorted(CASES)

# Refused whatever the algorithm.
INVALID: tuple[tuple[dict[str, Any], str], ...] = (
    ({"inner_lr": 0.0}, "--inner-lr"),
    ({"inner_lr": -0.1}, "--inner-lr"),
    ({"inner_steps": -1}, "--inner-steps"),
    ({"outer_lr": 0.0}, "--outer-lr"),
    ({"tasks_per_client": 0}, "--tasks-per-client"),
    ({"shots": 0}, "--shots"),
    ({"first_order_rounds": -1}, "--first-order-rounds"),
    ({"perfedavg_variant": "so"}, "--perfedavg-variant"),
)


def test_the_table_covers_every_algorithm() -> None:
    missing = set(ALGORITHMS) - {c.algorithm for c in CASES.values()}
    assert not missing, f"add a row for {sorted(missing)} to CASES in {__name__}"
    assert {c.algorithm for c in CASES.values()} == set(ALGORITHMS)


# ---- inputs -----------------------------------------------------------------------------------------


def perturbed(params: Params, seed: int) -> Params:
    """The meta-parameters with the extras ("meta.*") moved off their initial value (= --inner-lr),
    so that a rule using --inner-lr where it should use its learned rates disagrees."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v * (0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)) if k.startswith(META) else v
           for k, v in params.items()}
    # Meta-Curvature's matrices start as the identity: move their off-diagonal entries too.
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if k.startswith(META + "mc.")
            and v.dim() == 2 else v for k, v in out.items()}


def setup(case: Case, *, dtype: torch.dtype = torch.float32, seed: int = 0,
          **overrides: Any) -> tuple[RunConfig, torch.nn.Module, Params, TaskBatch]:
    run = case.run(**overrides)
    params = {k: v.to(dtype) for k, v in perturbed(meta_parameters(run, seed), seed).items()}
    batch = make_tasks(run, data_seed=seed).sample("train", num_tasks=run.tasks_per_client, shots=run.shots,
                                                   queries=run.queries, seed=seed + 100)
    batch = TaskBatch(*(t.to(dtype) if t.is_floating_point() else t
                        for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    return run, build_model(run.model), params, batch


def client_step(case: Case, run: RunConfig, model: torch.nn.Module, params: Params, batch: TaskBatch, *,
                vectorize: bool = True):  # type: ignore[no-untyped-def]
    inner = InnerConfig.from_run(run, round_index=case.round_index, vectorize=vectorize)
    return ALGORITHMS[case.algorithm].client_step(model, params, batch, loss_for(run.task), inner)


# ---- (a) names, shapes, kind ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_update_has_the_meta_parameters_names_shapes_and_kind(name: str) -> None:
    case = CASES[name]
    algorithm = ALGORITHMS[case.algorithm]
    assert algorithm.name == case.algorithm
    assert algorithm.update_kind is case.kind
    assert algorithm.default_outer_lr > 0
    run, model, params, batch = setup(case)
    expected = meta_parameters(run, 0)
    assert list(params) == list(expected)
    model_keys = [k for k, _ in model.named_parameters()]
    assert [k for k in expected if not k.startswith(META)] == model_keys
    extras = algorithm.extra_parameters(model_part_of(expected), run) if algorithm.extra_parameters else {}
    assert [k for k in expected if k.startswith(META)] == list(extras)
    before = {k: v.clone() for k, v in params.items()}
    update = client_step(case, run, model, params, batch)
    assert list(update.tensors) == list(expected)
    for k, t in update.tensors.items():
        assert t.shape == expected[k].shape and t.dtype == torch.float32, k
        assert not t.requires_grad and bool(torch.isfinite(t).all()), k
    assert sum(float(t.abs().sum()) for t in update.tensors.values()) > 0
    assert update.weight == float(batch.num_tasks)
    assert set(update.metrics) >= {"loss_pre", "loss_post"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in update.metrics.values())
    assert all(torch.equal(params[k], before[k]) for k in params), "client_step modified its input"


# ---- (b) seeded determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_client_step_is_deterministic(name: str) -> None:
    case = CASES[name]
    first = client_step(case, *setup(case, seed=1))
    second = client_step(case, *setup(case, seed=1))  # everything rebuilt from the same seeds
    for k in first.tensors:
        assert torch.equal(first.tensors[k], second.tensors[k]), k
    assert first.metrics == second.metrics and first.weight == second.weight
    run, model, params, _ = setup(case, seed=1)
    _, _, _, other_batch = setup(case, seed=2)
    other = client_step(case, run, model, params, other_batch)
    assert any(not torch.equal(first.tensors[k], other.tensors[k]) for k in first.tensors)


# ---- (c) agreement with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("name", NAMES)
def test_client_step_matches_the_reference_in_float64(name: str, vectorize: bool) -> None:
    case = CASES[name]
    run, model, params, batch = setup(case, dtype=torch.float64, seed=5)
    update = client_step(case, run, model, params, batch, vectorize=vectorize)
    expected, pre, post = case.reference(run, params, batch, case.round_index)
    assert list(update.tensors) == list(expected)
    for k in expected:
        assert update.tensors[k].dtype == torch.float64, k
        torch.testing.assert_close(update.tensors[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
    assert update.metrics["loss_pre"] == pytest.approx(pre, rel=1e-10)
    assert update.metrics["loss_post"] == pytest.approx(post, rel=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_client_step_matches_the_reference_in_float32(name: str) -> None:
    case = CASES[name]
    run, model, params, batch = setup(case, seed=6)
    update = client_step(case, run, model, params, batch)
    expected, pre, post = case.reference(run, params, batch, case.round_index)
    for k in expected:
        torch.testing.assert_close(update.tensors[k], expected[k], rtol=1e-5, atol=1e-5, msg=k)
    assert update.metrics["loss_pre"] == pytest.approx(pre, rel=1e-5)
    assert update.metrics["loss_post"] == pytest.approx(post, rel=1e-5)


def test_the_references_tell_the_variants_apart() -> None:
    """The rows that share an algorithm really test different things: their updates differ."""
    for a, b in (("mamlpp", "mamlpp-first-order"), ("perfedavg-fo", "perfedavg-hf"), ("maml", "fomaml"),
                 ("metacurvature", "metacurvature-first-order-diagonal")):
        run_a, _, params, batch = setup(CASES[a], dtype=torch.float64, seed=5)
        run_b = CASES[b].run()
        ua, _, _ = CASES[a].reference(run_a, params, batch, CASES[a].round_index)
        ub, _, _ = CASES[b].reference(run_b, params, batch, CASES[b].round_index)
        gap = max(float((ua[k] - ub[k]).abs().max()) for k in ua)
        assert gap > 1e-6, (a, b, gap)


def test_msl_weights_reference_anneals_to_the_last_step() -> None:
    assert ref_msl_weights(2, 0, 20, True) == [0.5, 0.5]
    assert ref_msl_weights(2, 1, 20, True) == pytest.approx([0.25, 0.75])
    assert ref_msl_weights(4, 50, 20, True) == pytest.approx([0.0075] * 3 + [1 - 3 * 0.0075])
    assert ref_msl_weights(3, 0, 20, False) == [0.0, 0.0, 1.0]


# ---- (d) adaptation and prediction --------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_adapt_matches_the_reference_adaptation(name: str, steps: int) -> None:
    case = CASES[name]
    run, model, params, batch = setup(case, dtype=torch.float64, seed=9)
    xs, ys = batch.x_support[0], batch.y_support[0]
    lr = run.inner_lr
    adapted = ALGORITHMS[case.algorithm].adapt(model, params, xs, ys, loss_for(run.task), steps=steps, lr=lr)
    expected = case.adapt_reference(run, params, xs, ys, steps, lr)
    assert list(adapted) == list(params)
    for k in params:
        torch.testing.assert_close(adapted[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
        if torch.equal(expected[k], params[k]):  # what the reference leaves alone is left exactly alone
            assert torch.equal(adapted[k], params[k]), k
    if case.adapt_reference is not adapt_none:
        assert not all(torch.equal(adapted[k], params[k]) for k in params)


def test_anil_adapts_the_head_only() -> None:
    run, model, params, batch = setup(CASES["anil"], seed=3)
    adapted = ALGORITHMS["anil"].adapt(model, params, batch.x_support[0], batch.y_support[0], loss_for(run.task),
                                       steps=2, lr=run.inner_lr)
    changed = [k for k in params if not torch.equal(adapted[k], params[k])]
    assert changed == head_names(params) == ["net.4.weight", "net.4.bias"]


@pytest.mark.parametrize("name", NAMES)
def test_predict_matches_the_reference_rule(name: str) -> None:
    case = CASES[name]
    run = case.run()
    predict = configured(ALGORITHMS[case.algorithm], run).predict  # with the run's settings of the rule
    assert (predict is None) == (case.predict_reference is None)
    if predict is None or case.predict_reference is None:
        return
    run, model, params, batch = setup(case, dtype=torch.float64, seed=4)
    for t in range(batch.num_tasks):
        xs, ys, xq, _ = task(batch, t)
        logits = predict(model, params, xs, ys, xq)
        expected = case.predict_reference(run, params, xs, ys, xq)
        # Columns past the classes present are padding with a very low logit.
        torch.testing.assert_close(logits[:, : run.ways], expected, rtol=1e-10, atol=1e-12)
        assert bool((logits[:, run.ways:] < -1e3).all())
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


# ---- (e) evaluate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_matches_the_reference_adaptation(name: str) -> None:
    case = CASES[name]
    run, model, params, batch = setup(case, dtype=torch.float64, seed=10)
    classification = is_classification(run.task)
    steps = run.eval_steps
    algorithm = configured(ALGORITHMS[case.algorithm], run)  # with the run's settings of its prediction rule
    metrics = evaluate(algorithm, model, params, batch, loss_for(run.task), steps=steps,
                       lr=run.inner_lr, classification=classification)
    assert all(math.isfinite(v) for v in metrics.values())
    keys = {"loss_pre", "loss_post", "loss_pre_sq", "loss_post_sq"}
    if classification:
        keys |= {"accuracy_pre", "accuracy_post", "accuracy_pre_sq", "accuracy_post_sq"}
    assert keys <= set(metrics)
    assert all(k.startswith("curve_") or k == "pre_tasks" for k in set(metrics) - keys)
    losses, accuracies = [], []
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = task(batch, t)
        adapted = case.adapt_reference(run, params, xs, ys, steps, run.inner_lr)
        if case.predict_reference is not None:
            out = case.predict_reference(run, adapted, xs, ys, xq)
        else:
            out = mlp(adapted, xq)
        losses.append(float(task_loss(run, out, yq)))
        if classification:
            accuracies.append(float((out.argmax(-1) == yq).double().mean()))
    assert metrics["loss_post"] == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    if classification:
        # evaluate counts correct predictions in float32
        assert metrics["accuracy_post"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-6)
        assert 0.0 <= metrics["accuracy_pre"] <= 1.0


# ---- (f) invalid hyperparameters --------------------------------------------------------------------------


def _invalid_cases() -> list[Any]:
    out = []
    for name in NAMES:
        for i, (bad, flag) in enumerate(CASES[name].invalid + INVALID):
            out.append(pytest.param(name, bad, flag, id=f"{name}-{i}-{flag.lstrip('-').replace(' ', '-')}"))
    return out


@pytest.mark.parametrize(("name", "bad", "flag"), _invalid_cases())
def test_invalid_hyperparameters_are_refused_naming_the_flag(name: str, bad: dict[str, Any], flag: str,
                                                             tmp_path) -> None:  # type: ignore[no-untyped-def]
    case = CASES[name]
    values = case.flags() | {"run_dir": str(tmp_path / "run")}
    build(values)  # the row's own settings are valid
    with pytest.raises(ValueError) as info:
        build(values | bad)
    assert str(info.value).startswith(flag), (str(info.value), flag)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("field_name", "value", "flag"), [
    ("perfedavg_variant", "xx", "--perfedavg-variant"),
    ("local_steps", 0, "--local-steps"),
    ("local_lr", 0.0, "--local-lr"),
    ("first_order_rounds", -1, "--first-order-rounds"),
    ("algorithm", "sgd", "--algorithm"),
])
def test_run_config_refuses_them_too(field_name: str, value: Any, flag: str) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(run_id="x", **{field_name: value})
    assert str(info.value).startswith(flag)


def test_protonet_is_refused_on_regression() -> None:
    with pytest.raises(ValueError, match="^--algorithm protonet: needs a classification task"):
        RunConfig(run_id="x", algorithm="protonet", task="sinusoid")


# ---- (g) one centralised step is the hand loop ------------------------------------------------------------


def first_outer_step(kind: UpdateKind, theta: torch.Tensor, update: torch.Tensor, lr: float) -> torch.Tensor:
    """The server's first step by hand: Adam's is theta - lr * g / (|g| + eps) (bias-corrected
    moments are g and g^2); averaging and Reptile's annealed step start at theta + lr * delta."""
    if kind is UpdateKind.META_GRADIENT:
        return theta - lr * update / (update.abs() + 1e-8)
    return theta + lr * update


@pytest.mark.parametrize("name", NAMES)
def test_centralised_training_is_the_hand_loop(name: str) -> None:
    case = CASES[name]
    algorithm = ALGORITHMS[case.algorithm]
    run, data_seed, outer_lr = case.run(seed=3), 4, 0.01
    model, loss_fn = build_model(run.model), loss_for(run.task)
    family = make_tasks(run, data_seed=data_seed, shard=data_seed)
    theta0 = meta_parameters(run, run.seed)
    layout = FlatLayout.of(theta0)

    def hand_update(flat: torch.Tensor, r: int) -> torch.Tensor:
        batch = family.sample("train", num_tasks=run.tasks_per_client, shots=run.shots, queries=run.queries,
                              seed=task_seed(run.seed, data_seed, STREAM_TRAIN, r))
        update = algorithm.client_step(model, layout.views(flat), batch, loss_fn,
                                       InnerConfig.from_run(run, round_index=r))
        return torch.cat([update.tensors[k].reshape(-1) for k in theta0])

    flat0 = layout.flatten(theta0)
    one = train(run, outer_lr=outer_lr, data_seeds=[data_seed], rounds=1)
    expected = first_outer_step(case.kind, flat0, hand_update(flat0, 0), outer_lr)
    assert list(one) == list(theta0)
    torch.testing.assert_close(layout.flatten(one), expected, rtol=0, atol=1e-6)
    assert float((layout.flatten(one) - flat0).abs().max()) > 1e-4  # the step moved theta

    # Two rounds (round 1 is where MAML++ changes order and Reptile anneals): the algorithm's own outer step.
    two = train(run, outer_lr=outer_lr, data_seeds=[data_seed], rounds=2)
    outer = algorithm.make_outer(OuterConfig(lr=outer_lr, rounds=run.rounds, cosine=run.cosine_outer))
    flat = flat0.clone()
    for r in range(2):
        outer.step(flat, hand_update(flat, r), r)
    torch.testing.assert_close(layout.flatten(two), flat, rtol=0, atol=1e-6)
