"""The aggregator of one round, from the coordinator's flags: --aggregator, and --clusters around it."""

from __future__ import annotations

from collections.abc import Callable

from fedmeta.common.aggregation import AGGREGATORS, Aggregator, FlatLayout, make_aggregator
from fedmeta.common.clusters import ClusteredAggregator
from fedmeta.common.task_aware import TaskAwareMean

ROUND_AGGREGATORS = (*AGGREGATORS, "task-aware")


def make_inner(kind: str, *, max_norm: float | None = None, trim: float = 0.2) -> Callable[[FlatLayout], Aggregator]:
    """A factory of --aggregator over a layout (one θ's, or the whole set's)."""
    if kind not in ROUND_AGGREGATORS:
        raise ValueError(f"--aggregator: expected one of {', '.join(ROUND_AGGREGATORS)}, got {kind!r}")

    def make(layout: FlatLayout) -> Aggregator:
        if kind == "task-aware":
            return TaskAwareMean(layout)
        return make_aggregator(kind, layout, max_norm=max_norm, trim=trim)

    return make


def make_round_aggregator(kind: str, layout: FlatLayout, *, max_norm: float | None = None, trim: float = 0.2,
                          clusters: int = 1, joint: bool = True, try_split: bool = False) -> Aggregator:
    """--aggregator over the whole θ (clusters 1), or per cluster's slice (ClusteredAggregator).

    joint: the clusters are not split yet (every update counts for all); try_split: split this round if the
    updates fall into groups (from --cluster-warmup on, until a split happened).
    """
    make = make_inner(kind, max_norm=max_norm, trim=trim)
    if clusters <= 1:
        return make(layout)
    return ClusteredAggregator(layout, clusters, make, joint=joint, try_split=try_split)
