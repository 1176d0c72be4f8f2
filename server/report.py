"""summary.json's "eval" section: pooled held-out metrics and each client's onboarding report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmeta.common.config import RunConfig
from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.evaluation import eval_steps, summarize
from fedmeta.common.models import build_model, uses_batch_statistics
from fedmeta.common.tasks import is_classification


def eval_summary(run: RunConfig, metrics: Mapping[str, float], tasks: float,
                 client_metrics: Mapping[str, dict[str, float]]) -> dict[str, Any]:
    """summary.json's "eval": pooled metrics over every held-out task, and a report per client."""
    classification = is_classification(run.task)
    out: dict[str, Any] = {
        "shots": run.eval_shots,
        "steps": eval_steps(get_algorithm(run.algorithm), run),
        "queries": run.eval_queries,
        "tasks": int(round(tasks)),
        "clients": len(client_metrics),
        "transductive_bn": uses_batch_statistics(build_model(run.model)),
    }
    if classification:
        out["ways"] = run.eval_ways
        out["train_ways"] = run.ways
    pre_tasks = _count(client_metrics, "pre_tasks") if client_metrics else tasks
    out |= summarize(metrics, tasks, classification=classification, pre_tasks=pre_tasks)
    out["pre_tasks"] = int(round(pre_tasks))  # "pre" is over the curve's tasks: theta before adaptation
    curve_tasks = _count(client_metrics, "curve_tasks")
    if out.get("curve") and curve_tasks:
        out["curve_tasks"] = int(round(curve_tasks))  # the curve is over this many (--eval-curve-tasks per client)
    else:  # no curve measured (protonet takes no steps; --eval-curve-tasks 0)
        out.pop("curve", None)
        out.pop("curve_metric", None)
    out["per_client"] = {cid: _client_report(m, classification=classification)
                         for cid, m in sorted(client_metrics.items())}
    return out


def _count(client_metrics: Mapping[str, dict[str, float]], key: str) -> float:
    """Tasks summed over clients that a metric subset covers (each client's count capped at its tasks)."""
    return sum(min(m.get(key, m.get("tasks", 0.0)), m.get("tasks", 0.0)) for m in client_metrics.values())


def _client_report(m: dict[str, float], *, classification: bool) -> dict[str, Any]:
    """One held-out client's onboarding report: its metric before/after and how many steps it needed."""
    tasks = m.get("tasks", 0.0)
    pre_tasks = min(m.get("pre_tasks", tasks), tasks)
    report = {"tasks": int(round(tasks))} | summarize(m, tasks, classification=classification, pre_tasks=pre_tasks)
    if not report.get("curve"):
        report.pop("curve", None)
        report.pop("curve_metric", None)
    curve = report.get("curve")
    curve = curve if isinstance(curve, list) else []
    report["steps_to_90pct"] = steps_to_fraction(curve, 0.9, higher_is_better=classification)
    return report


def steps_to_fraction(curve: list[float], fraction: float, *, higher_is_better: bool) -> int | None:
    """The first step whose gain over step 0 reaches `fraction` of the final gain (None without a gain)."""
    if len(curve) < 2:
        return None
    sign = 1.0 if higher_is_better else -1.0
    total = sign * (curve[-1] - curve[0])
    if not total > 0:
        return None
    for step, value in enumerate(curve):
        if sign * (value - curve[0]) >= fraction * total:
            return step
    return len(curve) - 1
