"""Task-aware aggregation: weight each update by how much it agrees with the federation.

w_i = n_i * max(0, cos(u_i, r)),   θ-update = sum_i w_i u_i / sum_i w_i,

with n_i the tasks the coordinator assigned client i (so w_i <= n_i: no client weighs more
than its share) and r a robust reference computed by the coordinator from what arrived:
the coordinate-wise median of the round's updates (Yin et al. 2018), which a minority
cannot move far. An update pointing away from the federation's direction (cos <= 0: a
different task family, or a hostile client) adds nothing; one along it keeps its task
weight. The cosine is scale-free, so magnitudes stay the business of the norm bounds
(--norm-clip-factor, --max-update-norm), which apply before an update is added. Related:
FLTrust (Cao et al. 2021) weights by ReLU(cos) to a server-held reference; here the
reference is the median, so the coordinator needs no data of its own.

Memory: the round's updates are kept (clients x model), as for median and trimmed mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedmeta.common.aggregation import FlatLayout, coordinate_median

# Below this |r| the median says nothing about a direction: plain task weights.
_TINY = 1e-30


def agreement(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max(0, cos(u_i, r)) for rows u_i of [clients, d]; 0 for a zero row, 1 for all when r = 0. Float64."""
    rows64, ref64 = rows.double(), reference.double()
    ref_norm = float(torch.linalg.vector_norm(ref64))
    if ref_norm <= _TINY:
        return torch.ones(rows.shape[0], dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows64, dim=1)
    cos = (rows64 @ ref64) / (norms * ref_norm).clamp_min(_TINY)
    return cos.clamp(min=0.0, max=1.0)


def task_aware_weights(rows: torch.Tensor, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_i = n_i * max(0, cos(u_i, median)), the agreements), float64; w_i <= n_i always.

    If no update agrees (every w_i = 0: possible only when every cosine to the median is <= 0),
    the task weights n_i are returned unchanged, so a round always moves by a convex combination.
    """
    if rows.dim() != 2 or rows.shape[0] != len(weights) or not weights:
        raise ValueError(f"task-aware weights: expected [clients, d] rows and one weight each, got "
                         f"{tuple(rows.shape)} and {len(weights)}")
    n = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not bool(((n > 0) & torch.isfinite(n)).all()):
        raise ValueError(f"weight: expected positive finite numbers, got {list(weights)!r}")
    a = agreement(rows, coordinate_median(rows))
    w = n * a
    return (n if float(w.sum()) <= 0 else w), a


class TaskAwareMean:
    """--aggregator task-aware: the round's updates, combined with task_aware_weights at the end."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.rows: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.count = 0
        self.last: dict[str, float] = {}

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight: expected a positive finite number, got {weight!r}")
        self.rows.append(self.layout.flatten(tensors))
        self.weights.append(float(weight))
        self.count += 1

    def take_mean(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("no update to aggregate")
        stacked = torch.stack(self.rows)
        w, a = task_aware_weights(stacked, self.weights)
        self.last = {"agreement_min": float(a.min()), "agreement_mean": float(a.mean()),
                     "zero_weight": float((a <= 0).sum()), "weight_kept": float(w.sum() / sum(self.weights))}
        self.rows, self.weights, self.count = [], [], 0
        return ((w.to(stacked.dtype) @ stacked) / float(w.sum())).to(torch.float32)

    def report(self) -> dict[str, float]:
        """The last round's agreement statistics, for metrics.jsonl."""
        return dict(self.last)
