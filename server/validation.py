"""Validation during training (`--eval-every`): which metric decides, and the record it leaves.

Every `eval_every` rounds (and after the last round) the coordinator evaluates θ on
validation tasks, appends a record to metrics.jsonl and, when θ is the best so far, exports
it to model-best/ (model selection on validation tasks, as MAML++ does; Antoniou et al.
2019). Post-adaptation accuracy decides for classification, post-adaptation loss (MSE)
for regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import ci95
from fedmeta.common.tasks import is_classification

EVENT = "validation"


@dataclass(frozen=True)
class Best:
    """The best validation so far: after how many rounds, and its value."""

    rounds_trained: int
    value: float

    def to_json(self) -> dict[str, Any]:
        return {"rounds_trained": self.rounds_trained, "value": self.value}

    @classmethod
    def from_json(cls, data: object) -> Best | None:
        if not isinstance(data, dict):
            return None
        rounds, value = data.get("rounds_trained"), data.get("value")
        if not isinstance(rounds, int) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return cls(rounds, float(value))


def due(run: RunConfig, rounds_trained: int, total_rounds: int) -> bool:
    """Whether θ after `rounds_trained` rounds is validated."""
    if run.eval_every <= 0 or rounds_trained <= 0:
        return False
    return rounds_trained % run.eval_every == 0 or rounds_trained == total_rounds


def metric(run: RunConfig) -> tuple[str, bool]:
    """(the metrics key that decides, whether higher is better)."""
    return ("accuracy_post", True) if is_classification(run.task) else ("loss_post", False)


def better(run: RunConfig, value: float, best: Best | None) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    _, higher = metric(run)
    return value > best.value if higher else value < best.value


def record(run: RunConfig, rounds_trained: int, metrics: dict[str, float], tasks: float, *, best: bool,
           wall_s: float, version: str) -> dict[str, Any]:
    """The metrics.jsonl line of one validation (its "event" tells it from a round's record)."""
    key, _ = metric(run)
    name = key.removesuffix("_post")
    value = metrics.get(key, float("nan"))
    out: dict[str, Any] = {
        "event": EVENT,
        "after_round": rounds_trained - 1,
        "rounds_trained": rounds_trained,
        "val_metric": "accuracy" if name == "accuracy" else ("mse" if run.task == "sinusoid" else "loss"),
        "val_value": value,
        f"val_{name}": value,
        f"val_{name}_pre": metrics.get(f"{name}_pre"),
        "val_ci95": ci95(value, metrics.get(f"{key}_sq", float("nan")), tasks),
        "val_tasks": int(round(tasks)),
        "best": best,
        "version": version,
        "wall_s": wall_s,
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
