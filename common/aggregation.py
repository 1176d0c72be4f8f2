"""Aggregation math over flat parameter vectors; no server needed to test it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from common.codec import TensorSpec, specs_of


class FlatLayout:
    """Where each named tensor lives in one contiguous float32 vector."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
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
        """flat += alpha * tensors, in place, tensor by tensor."""
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
