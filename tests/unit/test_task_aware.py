"""The math of task-aware weights, the cluster split, clustered aggregation and the settings that combine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmeta.common.aggregation import FlatLayout, WeightedMean
from fedmeta.common.algorithms.base import OuterConfig
from fedmeta.common.algorithms.outer import AdamOuter
from fedmeta.common.cluster_split import min_group_size, split_groups
from fedmeta.common.clusters import (ClusteredAggregator, ClusterState, cluster_of, embed, guarded_cluster_step,
                                     split, stack)
from fedmeta.common.round_aggregator import make_inner, make_round_aggregator
from fedmeta.common.task_aware import TaskAwareMean, agreement, task_aware_weights
from fedmeta.server.config import build

THETA = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}


def test_weight_is_tasks_times_the_clipped_cosine_to_the_median() -> None:
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, -1.0], [2.0, 0.5]])
    median = torch.tensor([1.0, 0.5])  # coordinate-wise, of the five rows
    w, a = task_aware_weights(rows, [1, 2, 3, 4, 5])
    cos = (rows @ median) / (rows.norm(dim=1) * median.norm())
    assert torch.allclose(a, cos.clamp(min=0).double())
    assert torch.allclose(w, torch.tensor([1, 2, 3, 4, 5.0]).double() * a)
    assert float(w[3]) == 0.0  # against the federation: nothing
    assert all(float(w[i]) <= i + 1 for i in range(5))  # never over its task share


def test_weights_are_scale_free_and_fall_back_to_task_weights_when_nobody_agrees() -> None:
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w1, _ = task_aware_weights(rows, [1, 1, 1])
    w2, _ = task_aware_weights(rows * 1e6, [1, 1, 1])  # the same federation in other units
    assert torch.allclose(w1, w2)
    assert torch.allclose(agreement(rows * 7.0, torch.tensor([1.0, 1.0])), agreement(rows, torch.tensor([1.0, 1.0])))
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # median 0: no direction, plain task weights
    w, a = task_aware_weights(opposite, [2, 3])
    assert w.tolist() == [2.0, 3.0] and a.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="weight"):
        task_aware_weights(rows, [1, 0, 1])


def test_task_aware_mean_matches_the_formula() -> None:
    layout = FlatLayout.of(THETA)
    agg = TaskAwareMean(layout)
    updates = [{"w": torch.full((2, 2), s), "b": torch.full((3,), s)} for s in (1.0, 2.0, -1.0)]
    for u, n in zip(updates, (4.0, 1.0, 4.0)):
        agg.add(u, n)
    got = agg.take_mean()
    w, _ = task_aware_weights(torch.stack([layout.flatten(u) for u in updates]), [4.0, 1.0, 4.0])
    assert w.tolist() == pytest.approx([4.0, 1.0, 0.0])
    assert torch.allclose(got, torch.full((7,), 6.0 / 5.0))
    assert agg.report()["zero_weight"] == 1.0 and agg.count == 0


def test_split_separates_two_directions_and_no_single_client_becomes_a_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    rows = torch.stack([s * base + 0.3 * torch.randn(50, generator=g) for s in (1, 1, 1, -1, -1, 1)])
    assert split_groups(rows, 2) == [[0, 1, 2, 5], [3, 4]]
    outlier = torch.cat([rows[[0, 1, 2, 5]], 100 * torch.randn(1, 50, generator=g)])
    assert split_groups(outlier, 2) is None  # the lone outlier cannot capture cluster 1
    assert min_group_size(8, 2) == 2 and min_group_size(20, 2) == 5


def test_cluster_of_reads_the_one_non_zero_slice() -> None:
    stacked = stack(THETA, 3)
    assert set(stacked) == {f"cluster.{j}.{n}" for j in range(3) for n in THETA}
    one = embed({"w": torch.ones(2, 2), "b": torch.zeros(3)}, 2, split(stacked, 3))
    assert cluster_of(one, 3) == 2
    with pytest.raises(ValueError, match="no cluster"):
        cluster_of({k: torch.zeros_like(v) for k, v in stacked.items()}, 3)
    both = dict(one) | {"cluster.0.b": torch.ones(3)}
    with pytest.raises(ValueError, match=r"clusters \[0, 2\]"):
        cluster_of(both, 3)
    with pytest.raises(ValueError, match="does not exist"):
        split({"cluster.3.w": torch.ones(1)}, 3)


def test_clustered_aggregator_aggregates_each_slice_over_who_chose_it() -> None:
    k, layout = 2, FlatLayout.of(stack(THETA, 2))
    thetas = split(stack(THETA, 2), k)
    agg = ClusteredAggregator(layout, k, make_inner("mean"), joint=False, try_split=False)
    agg.add(embed({"w": torch.ones(2, 2), "b": torch.ones(3)}, 1, thetas), 1.0)
    agg.add(embed({"w": 3 * torch.ones(2, 2), "b": 3 * torch.ones(3)}, 1, thetas), 3.0)
    agg.add(embed({"w": 1e3 * torch.ones(2, 2), "b": torch.ones(3)}, 0, thetas), 4.0)  # alone in cluster 0
    out = agg.take_mean()
    assert torch.equal(out[:7], torch.zeros(7)) and torch.allclose(out[7:], torch.full((7,), 2.5))
    assert agg.idle == [(0, 7)] and agg.report()["cluster_counts"] == [1, 2]  # one client never moves a cluster
    joint = make_round_aggregator("mean", layout, clusters=2, joint=True)
    joint.add(embed({"w": torch.ones(2, 2), "b": torch.ones(3)}, 1, thetas), 1.0)  # before the split: for all
    assert torch.equal(joint.take_mean(), torch.ones(14))
    assert isinstance(make_round_aggregator("mean", FlatLayout.of(THETA)), WeightedMean)


def test_a_cluster_nobody_chose_stays_exactly_as_it_was_under_adam() -> None:
    outer = AdamOuter(OuterConfig(lr=0.1, rounds=10))
    theta = torch.zeros(4)
    guarded_cluster_step(outer, theta, torch.tensor([1.0, 1.0, 1.0, 1.0]), 0, [])
    before, m_before = theta.clone(), outer.state_dict()["exp_avg"].clone()
    guarded_cluster_step(outer, theta, torch.tensor([0.0, 0.0, 1.0, 1.0]), 1, [(0, 2)])
    assert torch.equal(theta[:2], before[:2]) and not torch.equal(theta[2:], before[2:])
    assert torch.equal(outer.state_dict()["exp_avg"][:2], m_before[:2])


def test_cluster_state_round_trips_and_refuses_garbage() -> None:
    assert ClusterState.from_json(ClusterState(7).to_json()).split_round == 7
    assert ClusterState.from_json(None).split_round is None
    for bad in ({"split_round": -1}, {"split_round": "3"}, [1]):
        with pytest.raises(ValueError, match="split_round"):
            ClusterState.from_json(bad)


@pytest.mark.parametrize("values, flag", [
    ({"cluster_warmup": 3}, "--cluster-warmup: needs --clusters"),
    ({"clusters": 3, "clients_per_round": 5}, "--clusters 3: needs --clients-per-round of at least 6"),
    ({"clusters": 2, "clients_per_round": 4, "mode": "centralized"}, "--clusters 2: only with --mode federated"),
    ({"clusters": 2, "clients_per_round": 4, "rounds": 5, "cluster_warmup": 5}, "--cluster-warmup 5"),
])
def test_combinations_that_make_no_sense_are_refused_naming_the_flags(tmp_path: Path, values, flag) -> None:
    with pytest.raises(ValueError) as info:
        build({"run_dir": str(tmp_path / "r")} | values)
    assert str(info.value).startswith(flag) and "\n" not in str(info.value)


def test_task_aware_and_clusters_combine_with_the_robust_aggregators(tmp_path: Path) -> None:
    for aggregator in ("mean", "median", "trimmed-mean", "task-aware"):
        c = build({"run_dir": str(tmp_path / aggregator), "aggregator": aggregator, "clusters": 2,
                   "clients_per_round": 4, "max_update_norm": 10.0})
        assert c.run.clusters == 2 and c.cluster_warmup == 10 and math.isfinite(c.max_update_norm)
    c = build({"run_dir": str(tmp_path / "c"), "aggregator": "clipped-mean", "max_update_norm": 1.0})
    assert c.run.clusters == 1 and c.cluster_warmup == 0
