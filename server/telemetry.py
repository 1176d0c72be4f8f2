"""What the coordinator counts for monitoring, in plain Python (no exporter needed to count).

Event sites bump it: Coordinator.commit (an update counted), the service's SubmitUpdate (an
update refused, by its RefusalReason), its WaitForAssignment (an update carried by a long-poll), and RunState.record (every metrics.jsonl record: a
round closed, a validation). The Prometheus exporter (server/prometheus.py) reads a snapshot
at each scrape. Every label value is from a fixed set the coordinator chose: update kinds,
RefusalReason names, metric names of the schema (common/metrics.py); never a string a peer
sent, never a client id (a peer would control the number of series).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmeta.common.metrics import TRAIN_METRICS
from fedmeta.common.refusal import Reason

KINDS = ("train", "validation", "evaluation")
# A refusal without a reason (none of the coordinator's own refusals; kept so that a count is never lost).
NO_REASON = "UNSPECIFIED"
REASONS = tuple(r.value for r in Reason) + (NO_REASON,)
# Round duration buckets, in seconds: a sinusoid round on loopback takes ~10 ms, a Conv4 round on slow links minutes.
ROUND_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# metrics.jsonl keys of a training round -> their names in the metric schema.
TRAIN_KEYS = {"meta_loss": "loss_post", "loss_pre": "loss_pre", "client_compute_s": "compute_s"}
# Validation record keys (server/validation.py record) -> schema names; the rest of a record is not a metric.
VALIDATION_KEYS = {"val_loss": "loss_post", "val_loss_pre": "loss_pre", "val_accuracy": "accuracy_post",
                   "val_accuracy_pre": "accuracy_pre"}
assert set(TRAIN_KEYS.values()) <= TRAIN_METRICS


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the counters (what one scrape reports)."""

    rounds_completed: int
    round_buckets: tuple[int, ...]  # cumulative counts per ROUND_BUCKETS_S bound, then +Inf
    round_sum_s: float
    accepted: Mapping[str, int]
    refused: Mapping[str, int]
    train: Mapping[str, float]
    validation: Mapping[str, float]
    validations: int
    carried: int = 0  # updates that came with a long-poll (WaitForAssignment), accepted or not


class Telemetry:
    """Thread-safe counters and last values; a RunState record sink (record(), summary())."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds = 0
        self._buckets = [0] * (len(ROUND_BUCKETS_S) + 1)
        self._round_sum = 0.0
        self._accepted = dict.fromkeys(KINDS, 0)
        self._refused = dict.fromkeys(REASONS, 0)
        self._train: dict[str, float] = {}
        self._validation: dict[str, float] = {}
        self._validations = 0
        self._carried = 0

    def update_carried(self) -> None:
        with self._lock:
            self._carried += 1

    def update_accepted(self, kind: str) -> None:
        if kind not in self._accepted:
            raise ValueError(f"update kind: expected one of {KINDS}, got {kind!r}")
        with self._lock:
            self._accepted[kind] += 1

    def update_refused(self, reason: Reason | None) -> None:
        with self._lock:
            self._refused[NO_REASON if reason is None else reason.value] += 1

    def record(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record: a training round's counts and last values, or a validation's."""
        with self._lock:
            if record.get("event") == "validation":
                self._validations += 1
                self._validation = _values(record, VALIDATION_KEYS)
                return
            if "round" not in record:
                return
            self._rounds += 1
            round_s = float(record.get("round_s") or 0.0)
            self._buckets[bisect.bisect_left(ROUND_BUCKETS_S, round_s)] += 1
            self._round_sum += round_s
            self._train = _values(record, TRAIN_KEYS)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The final evaluation: nothing counted here (trackers keep it)."""

    def close(self) -> None:
        """Nothing to flush."""

    def snapshot(self) -> Snapshot:
        with self._lock:
            cumulative, total = [], 0
            for n in self._buckets:
                total += n
                cumulative.append(total)
            return Snapshot(self._rounds, tuple(cumulative), self._round_sum, dict(self._accepted),
                            dict(self._refused), dict(self._train), dict(self._validation), self._validations,
                            self._carried)


def _values(record: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, float]:
    """The finite numbers of a record under its schema names."""
    out = {}
    for key, name in keys.items():
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out
