"""Aggregation math over flat parameter vectors; no server needed to test it."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fedmeta.common.codec import TensorSpec, specs_of


class FlatLayout:
    """Where each named tensor lives in one contiguous float32 vector."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for s in self.specs:
            self.offsets[s.name] = (offset, offset + s.numel)
            offset += s.numel
        self.numel = offset

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> FlatLayout:
        return cls(specs_of(tensors))

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A new contiguous float32 vector holding the tensors in layout order."""
        flat = torch.empty(self.numel, dtype=torch.float32)
        for s in self.specs:
            a, b = self.offsets[s.name]
            flat[a:b] = tensors[s.name].reshape(-1)
        return flat

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector (no copy)."""
        return {s.name: flat[slice(*self.offsets[s.name])].view(s.shape) for s in self.specs}

    def add_(self, flat: torch.Tensor, tensors: Mapping[str, torch.Tensor], alpha: float) -> None:
        """flat += alpha * tensors, in place: in one op when they are decode()'s views of one vector
        in this layout's order, else tensor by tensor."""
        whole = getattr(tensors, "flat", None)
        if whole is not None and whole.numel() == flat.numel() and tuple(tensors) == self.names:
            flat.add_(whole, alpha=alpha)
            return
        for name, t in tensors.items():
            a, b = self.offsets[name]
            flat[a:b].add_(t.reshape(-1), alpha=alpha)


class WeightedMean:
    """Streaming weighted mean: sum_i w_i u_i / sum_i w_i, in O(model) memory.

    Updates are added as they arrive; nothing per client is kept.
    """

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.total = torch.zeros(layout.numel, dtype=torch.float32)
        self.weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight: expected a positive finite number, got {weight!r}")
        self.layout.add_(self.total, tensors, alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no update to aggregate")
        return self.total / self.weight

    def take_mean(self) -> torch.Tensor:
        """The mean, computed in place in the sum's buffer (no copy); the accumulator is spent."""
        if self.count == 0:
            raise ValueError("no update to aggregate")
        self.count = 0
        return self.total.div_(self.weight)


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i u_i / sum_i w_i over whole updates (reference form, O(clients x model))."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"expected as many weights as updates (>= 1), got {len(updates)} and {len(weights)}")
    total = sum(weights)
    return {k: sum(w * u[k] for u, w in zip(updates, weights)) / total for k in updates[0]}  # type: ignore[misc]


class Aggregator(Protocol):
    """A round's aggregation strategy: updates are added as they arrive, then taken once."""

    count: int

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None: ...

    def take_mean(self) -> torch.Tensor: ...


# Elements per float64 block of update_norm: its temporary is 512 KiB, where a float64 cast of a
# whole update would be twice the update (two such casts at once were 4 model sizes of the
# coordinator's peak under concurrent uploads).
NORM_BLOCK = 1 << 16


def _norm64(t: torch.Tensor) -> float:
    """||t||, accumulated in float64 a block at a time."""
    flat = t.reshape(-1)
    if flat.numel() <= NORM_BLOCK:
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    return math.sqrt(sum(float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2 for b in flat.split(NORM_BLOCK)))


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update: sqrt(sum over tensors of ||t||^2), accumulated in float64.

    (A float32 norm overflows to inf for values ~1e18 and more, which float32 holds finitely.)
    """
    flat = getattr(tensors, "flat", None)  # common/codec.py TensorSet: all tensors as one vector
    if flat is not None:
        return _norm64(flat)
    return math.sqrt(sum(_norm64(t) ** 2 for t in tensors.values()))


class NormFilter:
    """Clip each update to at most `factor` x the median L2 norm of the last `window` accepted ones.

    scale(norm) = min(1, factor * median(recent) / norm) once `warmup` norms are recorded
    (1 before). The recorded norm is the norm after clipping, so clipped outliers cannot
    drag the median up while they are a minority of the window. Against a finite but huge
    update (1e15 under the hard bound) that would otherwise move theta by 1e15 (parameter
    deltas) or fill Adam's second moment with 1e30 and so freeze every later step for
    thousands of rounds; an outlier at factor 10 adds at most (1 - beta2) * 100 = 0.1 times
    a typical g^2 to Adam's second moment. factor 0 turns the filter off.
    """

    def __init__(self, *, factor: float, window: int, warmup: int) -> None:
        if not (factor == 0 or (factor >= 1 and math.isfinite(factor))):
            raise ValueError(f"--norm-clip-factor: expected 0 (off) or a finite number >= 1, got {factor!r}")
        if window < 1 or not (1 <= warmup <= window):
            raise ValueError(f"--norm-clip-warmup: expected 1 to --norm-clip-window ({window}), got {warmup!r}")
        self.factor = factor
        self.warmup = warmup
        self.recent: deque[float] = deque(maxlen=window)

    def limit(self) -> float | None:
        """The current bound on an update's norm; None while warming up or when off."""
        if self.factor == 0 or len(self.recent) < self.warmup:
            return None
        return self.factor * statistics.median(self.recent)

    def scale(self, norm: float) -> float:
        """The factor (in (0, 1]) to multiply an update of this norm by; records the clipped norm."""
        limit = self.limit()
        scale = 1.0 if limit is None or norm <= limit or limit <= 0 else limit / norm
        self.recent.append(norm * scale)
        return scale


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of [clients, d] (Yin et al. 2018); for an even count, the mean of the middle two."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the floor(trim * n) largest and smallest values (Yin et al. 2018)."""
    n = stacked.shape[0]
    k = int(trim * n)
    if 2 * k >= n:
        raise ValueError(f"trimmed mean: trimming {k} of {n} updates from each side leaves none")
    return stacked.sort(dim=0).values[k : n - k].mean(dim=0)


class BufferedAggregator:
    """Median or trimmed mean: keeps every update of the round (memory O(clients x model)); weights are ignored."""

    def __init__(self, layout: FlatLayout, kind: str, *, trim: float = 0.2) -> None:
        if kind not in ("median", "trimmed-mean"):
            raise ValueError(f"aggregator: expected median or trimmed-mean, got {kind!r}")
        self.layout = layout
        self.kind = kind
        self.trim = trim
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight: expected a positive finite number, got {weight!r}")
        self.rows.append(self.layout.flatten(tensors))
        self.count += 1

    def take_mean(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("no update to aggregate")
        stacked = torch.stack(self.rows)
        self.rows = []
        self.count = 0
        return coordinate_median(stacked) if self.kind == "median" else trimmed_mean(stacked, self.trim)


class ClippedMean(WeightedMean):
    """Weighted mean of updates each scaled to L2 norm <= max_norm (streaming, O(model))."""

    def __init__(self, layout: FlatLayout, max_norm: float) -> None:
        super().__init__(layout)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"--max-update-norm: expected a positive number for clipped-mean, got {max_norm!r}")
        self.max_norm = max_norm

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        norm = update_norm(tensors)
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        if scale < 1.0:
            tensors = {k: v * scale for k, v in tensors.items()}
        super().add(tensors, weight)


AGGREGATORS = ("mean", "median", "trimmed-mean", "clipped-mean")


def make_aggregator(kind: str, layout: FlatLayout, *, max_norm: float | None = None, trim: float = 0.2) -> Aggregator:
    if kind == "mean":
        return WeightedMean(layout)
    if kind == "clipped-mean":
        if max_norm is None:
            raise ValueError("--aggregator clipped-mean: needs --max-update-norm")
        return ClippedMean(layout, max_norm)
    return BufferedAggregator(layout, kind, trim=trim)
