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

from common.algorithms import Algorithm
from common.algorithms.inner import Params, forward, map_tasks
from common.tasks import STREAM_EVAL, STREAM_VAL, LossFn, TaskBatch, TaskFamily, is_classification, loss_for, task_seed

if TYPE_CHECKING:
    from common.config import RunConfig

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
) -> dict[str, float]:
    """Query loss (and accuracy) before and after adaptation, their squares, and the curve.

    "pre" is theta itself; "post" is theta after `steps` adaptation steps on the support set.
    The curve follows the accuracy for classification and the loss for regression.
    """

    def per_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        out = []
        for q in adaptation_path(algorithm, model, p, xs, ys, loss_fn, steps=steps, lr=lr):
            if algorithm.predict is not None:
                pred = algorithm.predict(model, q, xs, ys, xq)
            else:
                pred = forward(model, q, xq)
            loss = loss_fn(pred, yq)
            acc = (pred.argmax(-1) == yq).float().mean() if classification else torch.zeros(())
            out.append(torch.stack([loss.detach(), acc]))
        return torch.stack(out)  # [steps + 1, 2]

    values = map_tasks(per_task, params, batch, vectorize=vectorize).detach().double()  # [tasks, steps + 1, 2]
    loss, acc = values[..., 0], values[..., 1]
    metrics = {
        "loss_pre": float(loss[:, 0].mean()),
        "loss_post": float(loss[:, -1].mean()),
        "loss_pre_sq": float((loss[:, 0] ** 2).mean()),
        "loss_post_sq": float((loss[:, -1] ** 2).mean()),
    }
    if classification:
        metrics |= {
            "accuracy_pre": float(acc[:, 0].mean()),
            "accuracy_post": float(acc[:, -1].mean()),
            "accuracy_pre_sq": float((acc[:, 0] ** 2).mean()),
            "accuracy_post_sq": float((acc[:, -1] ** 2).mean()),
        }
    curve = acc if classification else loss
    metrics |= {f"curve_{k}": float(curve[:, k].mean()) for k in range(curve.shape[1])}
    return metrics


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

    Besides `evaluate` at --eval-shots, a second batch of held-out tasks gives the metric with
    another number of examples: one shot per class for classification (`shots_1`), twice
    --eval-shots for regression (where a single point makes a poor, often divergent, fit),
    next to `shots_<eval_shots>`: what a new data holder gains from labelling more examples.
    """
    classification = is_classification(run.task)
    primary = "accuracy" if classification else "loss"
    batch = tasks.sample("eval", num_tasks=run.eval_tasks_per_client, shots=run.eval_shots,
                         queries=run.eval_queries, seed=task_seed(run.seed, data_seed, STREAM_EVAL, 0))
    metrics = evaluate(algorithm, model, params, batch.to(device), loss_for(run.task), steps=run.eval_steps,
                       lr=run.inner_lr, vectorize=vectorize, classification=classification)
    other = 1 if classification else 2 * run.eval_shots
    if other != run.eval_shots:
        more = tasks.sample("eval", num_tasks=run.eval_tasks_per_client, shots=other, queries=run.eval_queries,
                            seed=task_seed(run.seed, data_seed, STREAM_EVAL, 1))
        m1 = evaluate(algorithm, model, params, more.to(device), loss_for(run.task), steps=run.eval_steps,
                      lr=run.inner_lr, vectorize=vectorize, classification=classification)
        metrics[f"shots_{other}"] = m1[f"{primary}_post"]
        metrics[f"shots_{run.eval_shots}"] = metrics[f"{primary}_post"]
    return metrics


def ci95(mean: float, mean_sq: float, n: float) -> float:
    """Half-width of the normal 95% confidence interval of a mean over n tasks, from E[x] and E[x^2]."""
    if n < 2:
        return float("nan")
    var = max(0.0, mean_sq - mean * mean) * n / (n - 1)
    return Z95 * math.sqrt(var / n)


def summarize(metrics: Mapping[str, float], tasks: float, *, classification: bool) -> dict[str, object]:
    """The summary.json "eval" fields from task-weighted mean metrics over `tasks` held-out tasks."""
    out: dict[str, object] = {
        "loss_pre": metrics.get("loss_pre"),
        "loss_post": metrics.get("loss_post"),
    }
    primary = "accuracy" if classification else "loss"
    if f"{primary}_post" in metrics:
        out["ci95"] = ci95(metrics[f"{primary}_post"], metrics.get(f"{primary}_post_sq", float("nan")), tasks)
        out["ci95_pre"] = ci95(metrics[f"{primary}_pre"], metrics.get(f"{primary}_pre_sq", float("nan")), tasks)
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
    onboarding batch.
    """
    batch = tasks.sample("val", num_tasks=run.val_tasks_per_client, shots=run.eval_shots, queries=run.eval_queries,
                         seed=task_seed(run.seed, data_seed, STREAM_VAL, rounds_trained))
    return evaluate(algorithm, model, params, batch.to(device), loss_for(run.task), steps=run.eval_steps,
                    lr=run.inner_lr, vectorize=vectorize, classification=is_classification(run.task))
