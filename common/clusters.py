"""Clustered meta-parameters (--clusters K): one θ per group of clients whose tasks pull apart.

The K θ's travel as one flat meta-parameter set under name prefixes `cluster.<j>.`, so the
broadcast, checkpoints and the export are unchanged (their bytes are K times one θ, and an
update is K times one θ on the wire: its other clusters are zeros). Following IFCA (Ghosh et
al. 2020, "An Efficient Framework for Clustered Federated Learning"), each client adapts
every cluster's θ on its support sets and trains the one that adapts best (lowest support
loss after adaptation), sending an update in that cluster's slice only; the coordinator
infers the cluster from which slice is non-zero (`cluster_of`: exactly one, else refused),
and aggregates each slice over the clients that chose it. A cluster fewer than
MIN_UPDATES clients chose in a round stays exactly as it was (`guarded_cluster_step`),
optimiser state included: one client alone never moves a cluster's θ.

The K θ's start identical and are trained as one (every update counts for all of them)
until the split: from round --cluster-warmup on, the coordinator groups a round's updates
by direction (common/cluster_split.py, after Sattler et al. 2020) and steps each cluster
with its group's mean; a round whose updates do not split into groups of at least
max(2, ceil(n / 2K)) stays joint, and the next round tries again. The split round is run
state (checkpointed). A new data holder (fedmeta-adapt) is assigned the same way: the
cluster whose θ adapts best on its support set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedmeta.common.aggregation import Aggregator, FlatLayout
from fedmeta.common.algorithms.base import Algorithm, OuterStep, Params
from fedmeta.common.algorithms.outer import guarded_step
from fedmeta.common.cluster_split import split_groups
from fedmeta.common.codec import TensorSpec
from fedmeta.common.evaluation import evaluate
from fedmeta.common.tasks import LossFn, TaskBatch

PREFIX = "cluster."
MIN_UPDATES = 2  # a cluster's θ moves only on the updates of at least this many clients in a round
_NAME = re.compile(r"^cluster\.(\d{1,4})\.(.+)$")


def cluster_name(j: int, name: str) -> str:
    return f"{PREFIX}{j}.{name}"


def cluster_index(name: str) -> tuple[int, str]:
    """(j, the parameter's own name) of `cluster.<j>.<name>`; ValueError otherwise."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"expected a tensor named cluster.<j>.<name>, got {name[:80]!r}")
    return int(m.group(1)), m.group(2)


def stack(params: Mapping[str, torch.Tensor], k: int) -> Params:
    """K identical copies of θ under cluster.<j>. prefixes (k = 1: θ itself, unprefixed)."""
    if k <= 1:
        return dict(params)
    return {cluster_name(j, n): t.clone() for j in range(k) for n, t in params.items()}


def split(params: Mapping[str, torch.Tensor], k: int) -> list[Params]:
    """The K θ's of a stacked set, with their own names (k = 1: [params])."""
    if k <= 1:
        return [dict(params)]
    out: list[Params] = [{} for _ in range(k)]
    for name, t in params.items():
        j, own = cluster_index(name)
        if j >= k:
            raise ValueError(f"tensor {name!r}: cluster {j} does not exist (--clusters {k})")
        out[j][own] = t
    return out


def embed(update: Mapping[str, torch.Tensor], j: int, clusters: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """An update of cluster j's θ as a full stacked update: zeros in every other cluster's slice."""
    out: Params = {}
    for i, theta in enumerate(clusters):
        for name, t in theta.items():
            out[cluster_name(i, name)] = update[name] if i == j else torch.zeros_like(t)
    return out


def cluster_of(tensors: Mapping[str, torch.Tensor], k: int) -> int:
    """The one cluster an update touches (its non-zero slice); ValueError for none or several."""
    touched = sorted({cluster_index(name)[0] for name, t in tensors.items() if bool(t.any())})
    if len(touched) != 1 or touched[0] >= k:
        what = "no cluster (every value is 0)" if not touched else f"clusters {touched}"
        raise ValueError(f"an update under --clusters {k} must change exactly one cluster's θ (the one that adapts "
                         f"best on the client's support set); this one changes {what}")
    return touched[0]


def identical(clusters: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Whether every cluster's θ is the same (before the split): nothing to choose."""
    return all(torch.equal(c[n], clusters[0][n]) for c in clusters[1:] for n in clusters[0])


def support_losses(algorithm: Algorithm, model: nn.Module, clusters: Sequence[Params], batch: TaskBatch,
                   loss_fn: LossFn, *, steps: int, lr: float, vectorize: bool = True) -> list[float]:
    """Mean support-set loss after adapting each θ_j on each task's support set (IFCA's criterion)."""
    on_support = TaskBatch(batch.x_support, batch.y_support, batch.x_support, batch.y_support)
    return [evaluate(algorithm, model, theta, on_support, loss_fn, steps=steps, lr=lr, vectorize=vectorize,
                     curve_tasks=0, pre=False)["loss_post"] for theta in clusters]


def choose(algorithm: Algorithm, model: nn.Module, clusters: Sequence[Params], batch: TaskBatch, loss_fn: LossFn,
           *, steps: int, lr: float, vectorize: bool = True) -> tuple[int, list[float]]:
    """(the cluster whose θ adapts best on the batch's support sets, every cluster's loss); 0 while identical."""
    if len(clusters) == 1 or identical(clusters):
        return 0, []
    losses = support_losses(algorithm, model, clusters, batch, loss_fn, steps=steps, lr=lr, vectorize=vectorize)
    finite = [(v if math.isfinite(v) else math.inf, j) for j, v in enumerate(losses)]
    return min(finite)[1], losses


@dataclass
class ClusterState:
    """What the coordinator remembers about clusters between rounds: the round they split at."""

    split_round: int | None = None

    def to_json(self) -> dict[str, int | None]:
        return {"split_round": self.split_round}

    @classmethod
    def from_json(cls, data: object) -> ClusterState:
        if data is None:
            return cls()
        value = data.get("split_round") if isinstance(data, dict) else "?"
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"checkpoint: clusters.split_round: expected null or a round >= 0, got "
                             f"{json.dumps(value)[:40]}")
        return cls(value)


class ClusteredAggregator:
    """One aggregator per cluster's slice (after the split), or one for all slices (before it).

    make_inner builds the --aggregator (mean, clipped-mean, median, trimmed-mean, task-aware)
    over one θ's layout; an update is added to the aggregator of the cluster it touches.
    take_mean returns the stacked update; `idle` lists the (start, stop) slices fewer than MIN_UPDATES chose.
    """

    def __init__(self, layout: FlatLayout, k: int, make_inner: Callable[[FlatLayout], Aggregator], *,
                 joint: bool, try_split: bool) -> None:
        self.k = k
        own = [TensorSpec(cluster_index(s.name)[1], s.dtype, s.shape) for s in layout.specs
               if cluster_index(s.name)[0] == 0]
        self.sub = FlatLayout(own)
        if self.sub.numel * k != layout.numel:
            raise ValueError(f"--clusters {k}: the parameters are not {k} copies of one θ")
        self.make_inner = make_inner
        self.joint, self.try_split = joint, try_split
        self.inner = [make_inner(self.sub) for _ in range(1 if joint else k)]
        self.rows: list[tuple[Params, float]] = []  # only while trying to split: the round's updates
        self.counts = [0] * k
        self.count = 0
        self.idle: list[tuple[int, int]] = []
        self.split_now = False
        self.groups: list[list[int]] | None = None  # after a split: row indices (the order of add) per cluster

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        j = cluster_of(tensors, self.k)
        own = {cluster_index(n)[1]: t for n, t in tensors.items() if cluster_index(n)[0] == j}
        self.inner[0 if self.joint else j].add(own, weight)
        if self.joint and self.try_split:
            self.rows.append((own, weight))
        self.counts[j] += 1
        self.count += 1

    def _groups(self) -> list[list[int]] | None:
        if not (self.joint and self.try_split) or len(self.rows) < 2 * self.k:
            return None
        return split_groups(torch.stack([self.sub.flatten(u) for u, _ in self.rows]), self.k)

    def take_mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no update to aggregate")
        d = self.sub.numel
        out = torch.zeros(d * self.k, dtype=torch.float32)
        groups = self._groups()
        if groups is not None:  # the split: group g's aggregate steps cluster g
            self.split_now, self.groups = True, groups
            self.counts = [len(g) for g in groups]
            for g, members in enumerate(groups):
                agg = self.make_inner(self.sub)
                for i in members:
                    agg.add(*self.rows[i])
                out[g * d:(g + 1) * d] = agg.take_mean()
        elif self.joint:
            mean = self.inner[0].take_mean()
            for j in range(self.k):
                out[j * d:(j + 1) * d] = mean
        else:
            for j, agg in enumerate(self.inner):
                if agg.count >= MIN_UPDATES:
                    out[j * d:(j + 1) * d] = agg.take_mean()
                else:
                    self.idle.append((j * d, (j + 1) * d))
        self.rows, self.count = [], 0
        return out

    def report(self) -> dict[str, object]:
        """Per-cluster counts of the round's updates (after a split: the groups), for metrics.jsonl."""
        return {"cluster_counts": list(self.counts), "clusters_joint": self.joint and not self.split_now}


def guarded_cluster_step(outer: OuterStep, theta: torch.Tensor, update: torch.Tensor, round_index: int,
                         idle: Sequence[tuple[int, int]]) -> float | None:
    """guarded_step, with the idle slices of θ and of the optimiser's per-coordinate state kept as they were.

    (Adam's momentum would otherwise move a cluster nobody chose on a zero gradient.)
    """
    before = outer.state_dict()
    saved = [(a, b, theta[a:b].clone(), {n: v[a:b].clone() for n, v in before.items()
                                         if v.dim() == 1 and v.numel() == theta.numel()}) for a, b in idle]
    lr = guarded_step(outer, theta, update, round_index)
    after = outer.state_dict()
    for a, b, values, state in saved:
        theta[a:b] = values
        for n, v in state.items():
            if n in after:
                after[n][a:b] = v
    return lr
