"""The metric schema: which names a client's update may carry, and the range of each value.

Training (client/worker.py): the algorithm's `loss_pre`, `loss_post` (every algorithm in
common/algorithms) plus the worker's `compute_s`. Evaluation (common/evaluation.py
evaluate_holder): `loss_{pre,post}` and their means of squares `loss_{pre,post}_sq`; for
classification also `accuracy_{pre,post}` and `accuracy_{pre,post}_sq`; optionally the
adaptation curve `curve_0` ... `curve_<eval_steps>` (absent for ProtoNets, which take no
steps, and with --eval-curve-tasks 0) and the task counts `pre_tasks` and `curve_tasks` (how
many of the holder's tasks "pre" and the curve are over, 0 ... its tasks); and, when a second
number of shots differs from --eval-shots, `shots_<k>` for k in {eval_shots, 1
(classification) or 2 * eval_shots (regression)}. Validation during training (--eval-every,
validate_holder): the same without `shots_<k>` and the curve.

Anything else is refused before it reaches the round's sums, the summary or the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedmeta.common.tasks import is_classification
from fedmeta.common.textsafe import clip

if TYPE_CHECKING:
    from fedmeta.common.config import RunConfig

# Longer than every name the schema allows ("accuracy_post_sq", "curve_<steps>").
MAX_NAME_CHARS = 32
# |value| bound that keeps a weighted float64 sum over any number of clients finite.
MAX_VALUE = 1e30
# A client step longer than this many seconds (11.6 days) is a lie, not a measurement.
MAX_COMPUTE_S = 1e6
TRAIN_METRICS = frozenset({"loss_pre", "loss_post", "compute_s"})
# Task counts an evaluation reports: how many of its tasks "pre" and the curve are over.
COUNTS = ("pre_tasks", "curve_tasks")
# Jensen: a mean of squares is at least the square of the mean; slack for float64 rounding.
_SLACK = 1e-9


def other_shots(run: RunConfig) -> int:
    """evaluate_holder's second number of shots: 1 for classification, 2 * eval_shots for regression."""
    return 1 if is_classification(run.task) else 2 * run.eval_shots


def allowed_metrics(run: RunConfig, *, evaluation: bool, validation: bool = False) -> frozenset[str]:
    """Every metric name an update of this run may carry (validation: a validation during training)."""
    if not evaluation:
        return TRAIN_METRICS
    required = required_metrics(run, evaluation=True, validation=validation)
    return required | set(COUNTS) | {f"curve_{k}" for k in range(run.eval_steps + 1)}


def required_metrics(run: RunConfig, *, evaluation: bool, validation: bool = False) -> frozenset[str]:
    """The names every update must carry: the evaluation's pooled loss, accuracy and shots metrics.

    Training metrics are optional (they only feed metrics.jsonl, averaged over the clients that
    sent them); an evaluation without one of these would bias the pooled summary.
    """
    if not evaluation:
        return frozenset()
    names = {"loss_pre", "loss_post", "loss_pre_sq", "loss_post_sq"}
    if is_classification(run.task):
        names |= {"accuracy_pre", "accuracy_post", "accuracy_pre_sq", "accuracy_post_sq"}
    other = other_shots(run)
    if other != run.eval_shots and not validation:
        names |= {f"shots_{run.eval_shots}", f"shots_{other}"}
    return frozenset(names)


def check_metrics(run: RunConfig, metrics: Mapping[str, float], *, evaluation: bool, validation: bool = False) -> None:
    """Raise ValueError (one line, peer text clipped) unless metrics fit the schema.

    Ranges: losses (loss_*, regression curve_* and shots_*) are finite and >= 0; task counts
    (pre_tasks, curve_tasks) in [0, the holder's tasks]; accuracies
    (accuracy_*, classification curve_* and shots_*) lie in [0, 1]; a mean of squares m2 and its
    mean m satisfy m2 >= m^2 (and m2 <= m for accuracies); 0 <= compute_s <= MAX_COMPUTE_S.
    """
    allowed = allowed_metrics(run, evaluation=evaluation, validation=validation)
    what = "a validation" if validation else "an evaluation" if evaluation else "a training update"
    for name in metrics:
        if len(name) > MAX_NAME_CHARS or name not in allowed:
            raise ValueError(f"metric {clip(name, 40)!r} is not one {what} of this run reports "
                             f"(expected names from {', '.join(sorted(allowed)[:12])}"
                             f"{', ...' if len(allowed) > 12 else ''})")
    missing = required_metrics(run, evaluation=evaluation, validation=validation) - metrics.keys()
    if missing:
        raise ValueError(f"metrics: {what} must report {', '.join(sorted(missing))}")
    curve = sorted(int(k[len("curve_"):]) for k in metrics if k.startswith("curve_") and k[len("curve_"):].isdigit())
    if curve != list(range(len(curve))):
        raise ValueError(f"metrics: the curve must be curve_0 ... curve_k without gaps, got steps {curve[:12]}")
    accuracy_like = is_classification(run.task)
    for name, value in metrics.items():
        accuracy = name.startswith("accuracy_") or (accuracy_like and name.startswith(("curve_", "shots_"))
                                                     and name not in COUNTS)
        if name == "compute_s":
            low, high = 0.0, MAX_COMPUTE_S
        elif name in COUNTS:
            low, high = 0.0, float(run.val_tasks_per_client if validation else run.eval_tasks_per_client)
        elif accuracy:
            low, high = 0.0, 1.0
        else:
            low, high = 0.0, MAX_VALUE
        if not (low <= value <= high):  # also refuses NaN
            raise ValueError(f"metric {name!r} must be finite and in [{low:g}, {high:g}], got {value!r}")
    for name, m2 in metrics.items():
        if name.endswith("_sq"):
            m = metrics.get(name[: -len("_sq")])
            if m is None:
                continue
            accuracy = name.startswith("accuracy_")
            if m2 < m * m * (1 - _SLACK) - _SLACK or (accuracy and m2 > m + _SLACK):
                bound = f"in [{m * m:.6g}, {m:.6g}]" if accuracy else f"at least {m * m:.6g}"
                raise ValueError(f"metric {name!r} is a mean of squares: expected {bound} "
                                 f"given {name[:-3]} = {m!r}, got {m2!r}")


def placeholder_metrics(run: RunConfig, *, evaluation: bool, validation: bool = False) -> dict[str, float]:
    """A report that fits the schema, every mean 0.5 (squares 0.25): for load generators and protocol tests."""
    names = (required_metrics(run, evaluation=True, validation=validation) if evaluation
             else frozenset({"loss_pre", "loss_post"}))
    return {k: 0.25 if k.endswith("_sq") else 0.5 for k in sorted(names)}
