"""Few-shot evaluation: adapt on each held-out task's support set, measure on its query set.

Metrics are means over the batch's tasks, plus means of squares (`*_sq`) so that a
coordinator summing many clients' weighted means can still form a confidence interval
over every task, and the adaptation curve (`curve_<step>`: the query metric after
0, 1, ..., steps adaptation steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmeta.common.algorithms import Algorithm, configured
from fedmeta.common.algorithms.inner import Params, forward, map_tasks
from fedmeta.common.tasks import STREAM_EVAL, STREAM_VAL, LossFn, TaskBatch, TaskFamily, is_classification, loss_for, task_seed

if TYPE_CHECKING:
    from fedmeta.common.config import RunConfig

Z95 = 1.959963984540054


def adaptation_path(
    algorithm: Algorithm, model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor,
    loss_fn: LossFn, *, steps: int, lr: float,
) -> list[Params]:
    """Parameters after 0, 1, ..., steps adaptation steps (one step at a time)."""
    if algorithm.adapt_path is not None:
        return list(algorithm.adapt_path(model, params, xs, ys, loss_fn, steps=steps, lr=lr))
    path = [params]
    for _ in range(steps):
        path.append(algorithm.adapt(model, path[-1], xs, ys, loss_fn, steps=1, lr=lr))
    return path


def predict(algorithm: Algorithm, model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor,
            xq: torch.Tensor) -> torch.Tensor:
    """Query outputs [queries, ...] of (adapted) params: the algorithm's rule (ProtoNets' prototypes of
    (xs, ys)) or f_params(xq), normalised with the support set's statistics when the model does so.

    With an inductive model (Conv4 norm "support", "group", "layer"; any MLP) row i depends
    on xq[i] and the support set only, never on the other queries.
    """
    if algorithm.predict is not None:
        return algorithm.predict(model, params, xs, ys, xq)
    return forward(model, params, xq, xs)


def evaluate(
    algorithm: Algorithm,
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    vectorize: bool = True,
    classification: bool = False,
    curve_tasks: int | None = None,
    pre: bool = True,
) -> dict[str, float]:
    """Query loss (and accuracy) after adaptation on every task, before it and the curve on a subset.

    "post" is theta after `steps` adaptation steps on the support set, over every task. The
    curve (the query metric after 0, 1, ..., steps steps: accuracy for classification, loss
    for regression) costs a query pass per step, so it is measured on the first `curve_tasks`
    tasks only (None: all of them; 0: no curve), and "pre" (theta itself, the curve's first
    point) on the same tasks; without a curve, "pre" is over every task (unless `pre` is
    False). `pre_tasks` and `curve_tasks` say on how many. With steps 0 (ProtoNets) pre and
    post coincide and are measured once. Query passes build no autograd graph.
    """
    n = batch.num_tasks
    c = 0 if steps == 0 else n if curve_tasks is None else max(0, min(curve_tasks, n))

    def score(q: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pred = predict(algorithm, model, q, xs, ys, xq)
            loss = loss_fn(pred, yq)
            acc = (pred.argmax(-1) == yq).float().mean() if classification else torch.zeros_like(loss)
            return torch.stack([loss, acc])

    def along_path(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        path = adaptation_path(algorithm, model, p, xs, ys, loss_fn, steps=steps, lr=lr)
        return torch.stack([score(q, xs, ys, xq, yq) for q in path])  # [steps + 1, 2]

    def pre_and_post(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        post = algorithm.adapt(model, p, xs, ys, loss_fn, steps=steps, lr=lr)
        return torch.stack([score(p, xs, ys, xq, yq), score(post, xs, ys, xq, yq)])  # [2, 2]

    def post_only(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        return score(algorithm.adapt(model, p, xs, ys, loss_fn, steps=steps, lr=lr), xs, ys, xq, yq)  # [2]

    def run(fn, start: int, stop: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return map_tasks(fn, params, _tasks(batch, start, stop), vectorize=vectorize).detach().double()

    curve = before = None
    if steps == 0:
        after = before = run(score, 0, n)  # [tasks, 2 (loss, accuracy)]
    elif c > 0:
        path = run(along_path, 0, c)  # [c, steps + 1, 2]
        curve, before = path[..., 1 if classification else 0], path[:, 0]
        after = torch.cat([path[:, -1], run(post_only, c, n)]) if c < n else path[:, -1]
    elif pre:
        both = run(pre_and_post, 0, n)
        before, after = both[:, 0], both[:, 1]
    else:
        after = run(post_only, 0, n)
    metrics = _means("post", after, classification)
    if before is not None:
        metrics |= _means("pre", before, classification) | {"pre_tasks": float(before.shape[0])}
    if curve is not None:
        metrics["curve_tasks"] = float(c)
        metrics |= {f"curve_{k}": float(curve[:, k].mean()) for k in range(curve.shape[1])}
    return metrics


def _means(when: str, values: torch.Tensor, classification: bool) -> dict[str, float]:
    """loss_<when>, accuracy_<when> and their mean squares from [tasks, 2 (loss, accuracy)]."""
    names = ("loss", "accuracy") if classification else ("loss",)
    out = {}
    for i, name in enumerate(names):
        out[f"{name}_{when}"] = float(values[:, i].mean())
        out[f"{name}_{when}_sq"] = float((values[:, i] ** 2).mean())
    return out


def _tasks(batch: TaskBatch, start: int, stop: int) -> TaskBatch:
    return TaskBatch(*(t[start:stop] for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))


def eval_steps(algorithm: Algorithm, run: RunConfig) -> int:
    """Adaptation steps the final evaluation takes: --eval-steps, or 0 for an algorithm that does not adapt."""
    return run.eval_steps if algorithm.adapts else 0


def evaluate_holder(
    algorithm: Algorithm,
    model: nn.Module,
    params: Params,
    tasks: TaskFamily,
    run: RunConfig,
    *,
    data_seed: int,
    device: torch.device | str = "cpu",
    vectorize: bool = True,
) -> dict[str, float]:
    """One data holder's part of the final evaluation: held-out tasks, the curve, and onboarding.

    --eval-tasks-per-client tasks of --eval-ways classes (default --ways), the adaptation curve on
    the first --eval-curve-tasks of them. Besides `evaluate` at --eval-shots, a second batch of held-out tasks gives the metric with
    another number of examples: one shot per class for classification (`shots_1`), twice
    --eval-shots for regression (where a single point makes a poor, often divergent, fit),
    next to `shots_<eval_shots>`: what a new data holder gains from labelling more examples.
    """
    classification = is_classification(run.task)
    primary = "accuracy" if classification else "loss"
    algorithm = configured(algorithm, run)  # the run's settings of its prediction rule (Matching Nets' steps)
    # Other ways than training only when asked (--eval-ways), so families without the keyword still work.
    ways = {"ways": run.eval_ways} if classification and run.eval_ways != run.ways else {}
    batch = tasks.sample("eval", num_tasks=run.eval_tasks_per_client, shots=run.eval_shots,
                         queries=run.eval_queries, seed=task_seed(run.seed, data_seed, STREAM_EVAL, 0), **ways)
    steps = eval_steps(algorithm, run)
    curve_tasks = run.eval_curve_tasks if steps > 0 else 0
    metrics = evaluate(algorithm, model, params, batch.to(device), loss_for(run.task), steps=steps,
                       lr=run.inner_lr, vectorize=vectorize, classification=classification, curve_tasks=curve_tasks)
    other = 1 if classification else 2 * run.eval_shots
    if other != run.eval_shots:
        more = tasks.sample("eval", num_tasks=run.eval_tasks_per_client, shots=other, queries=run.eval_queries,
                            seed=task_seed(run.seed, data_seed, STREAM_EVAL, 1), **ways)
        m1 = evaluate(algorithm, model, params, more.to(device), loss_for(run.task), steps=steps,
                      lr=run.inner_lr, vectorize=vectorize, classification=classification, curve_tasks=0, pre=False)
        metrics[f"shots_{other}"] = m1[f"{primary}_post"]
        metrics[f"shots_{run.eval_shots}"] = metrics[f"{primary}_post"]
    return metrics


def ci95(mean: float, mean_sq: float, n: float) -> float:
    """Half-width of the normal 95% confidence interval of a mean over n tasks, from E[x] and E[x^2]."""
    if n < 2:
        return float("nan")
    var = max(0.0, mean_sq - mean * mean) * n / (n - 1)
    return Z95 * math.sqrt(var / n)


def summarize(metrics: Mapping[str, float], tasks: float, *, classification: bool,
              pre_tasks: float | None = None) -> dict[str, object]:
    """The summary.json "eval" fields from task-weighted mean metrics over `tasks` held-out tasks.

    `pre_tasks`: how many of them the "pre" metrics are over (default: all).
    """
    out: dict[str, object] = {
        "loss_pre": metrics.get("loss_pre"),
        "loss_post": metrics.get("loss_post"),
    }
    primary = "accuracy" if classification else "loss"
    if f"{primary}_post" in metrics:
        out["ci95"] = ci95(metrics[f"{primary}_post"], metrics.get(f"{primary}_post_sq", float("nan")), tasks)
        out["ci95_pre"] = ci95(metrics[f"{primary}_pre"], metrics.get(f"{primary}_pre_sq", float("nan")),
                               tasks if pre_tasks is None else pre_tasks)
    if classification:
        out["accuracy_pre"] = metrics.get("accuracy_pre")
        out["accuracy_post"] = metrics.get("accuracy_post")
    steps = sorted(int(k.split("_")[1]) for k in metrics if k.startswith("curve_") and k.split("_")[1].isdigit())
    out["curve_metric"] = primary
    out["curve"] = [metrics[f"curve_{k}"] for k in steps]
    shots = sorted(int(k.split("_")[1]) for k in metrics if k.startswith("shots_") and k.split("_")[1].isdigit())
    if shots:
        out["by_shots"] = {str(k): metrics[f"shots_{k}"] for k in shots}
    return out


def validate_holder(
    algorithm: Algorithm,
    model: nn.Module,
    params: Params,
    tasks: TaskFamily,
    run: RunConfig,
    *,
    data_seed: int,
    rounds_trained: int,
    device: torch.device | str = "cpu",
    vectorize: bool = True,
) -> dict[str, float]:
    """One data holder's validation during training: `evaluate` on `val_tasks_per_client` validation tasks.

    Validation tasks (split "val") are disjoint from training and from the final test; the
    batch is seeded by the rounds trained so far, so every validation sees fresh tasks and a
    resumed run sees the same ones. Same settings as the final evaluation, without its
    onboarding batch and its curve (--eval-ways, --eval-shots, --eval-steps as the test).
    """
    classification = is_classification(run.task)
    algorithm = configured(algorithm, run)
    ways = {"ways": run.eval_ways} if classification and run.eval_ways != run.ways else {}
    batch = tasks.sample("val", num_tasks=run.val_tasks_per_client, shots=run.eval_shots, queries=run.eval_queries,
                         seed=task_seed(run.seed, data_seed, STREAM_VAL, rounds_trained), **ways)
    # No curve: validation only picks the best theta, by its post-adaptation metric.
    return evaluate(algorithm, model, params, batch.to(device), loss_for(run.task), steps=eval_steps(algorithm, run),
                    lr=run.inner_lr, vectorize=vectorize, classification=classification, curve_tasks=0)
