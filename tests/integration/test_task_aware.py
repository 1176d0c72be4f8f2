"""Task-aware aggregation and --clusters against a real in-process coordinator, with raw stubs.

A client cannot steer the weights or the clusters beyond its own update: the coordinator reads
the cluster off the tensors (exactly one slice non-zero, else BAD_TENSORS), a cluster that does
not exist is not in the run's tensor specs (BAD_TENSORS), a weight over the assigned tasks is
refused (BAD_WEIGHT), and task-aware weights are computed from what arrived (an update against
the federation's direction weighs 0). The split round survives a restart.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch

from fedmeta.common.clusters import cluster_name, split
from fedmeta.common.refusal import Reason, reason_from_metadata
from fedmeta.common.task_aware import task_aware_weights
from fedmeta.server.config import build
from fedmeta.server.coordinator import Coordinator
from tests.integration.conftest import InProcessServer, wait_for
from tests.integration.test_hostile import (Session, adam_step, close_to, encoded, join, refused, session,
                                            snapshot, stream, submit)
import pytest

pytestmark = pytest.mark.integration

Tensors = dict[str, torch.Tensor]
FOUR = {"rounds": 3, "clients_per_round": 4, "min_clients": 4, "round_deadline_s": 60.0, "norm_clip_factor": 0.0}


def sessions(inprocess_server: Callable[..., InProcessServer], n: int, **settings: object) -> list[Session]:
    server = inprocess_server(**(FOUR | settings))
    ids = [f"c{i}" for i in range(n)]
    run_id = ""
    for cid in ids:
        run_id = join(server, cid).run_id
    return [session(server, cid, run_id) for cid in ids]


def direction(s: Session, sign: float, seed: int, *, cluster: int | None = None, k: int = 1) -> Tensors:
    """sign x a fixed direction + small noise, in one cluster's slice (cluster None: no clusters)."""
    base = torch.Generator().manual_seed(99)
    noise = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name, v in sorted(s.params.items()):
        out[name] = sign * 0.01 * torch.randn(v.shape, generator=base) + 0.001 * torch.randn(v.shape, generator=noise)
    if cluster is None:
        return out
    own = split(out, k)[cluster]
    return {name: (own[name.split(".", 2)[2]] if name.startswith(f"cluster.{cluster}.") else torch.zeros_like(v))
            for name, v in s.params.items()}


def reason_of(err: grpc.RpcError) -> Reason | None:
    return reason_from_metadata(err.trailing_metadata())  # type: ignore[attr-defined]


def test_task_aware_gives_an_update_against_the_federation_no_weight(inprocess_server) -> None:
    ss = sessions(inprocess_server, 4, aggregator="task-aware")
    before = snapshot(ss[0])
    honest = [(direction(s, 1.0, i), 4.0) for i, s in enumerate(ss[:3])]
    for s, (u, w) in zip(ss[:3], honest):
        assert submit(s, stream(*encoded(s, u, weight=w))).accepted
    # The attacker claims its full share (weight 4 of 4 tasks) and points the other way, 100x larger.
    attacker = {k: -100.0 * v for k, v in honest[0][0].items()}
    assert submit(ss[3], stream(*encoded(ss[3], attacker, weight=4.0))).accepted
    wait_for(lambda: ss[0].coordinator.version != before.version, timeout_s=20, what="the round to close")
    layout = ss[0].coordinator.layout
    rows = torch.stack([layout.flatten(u) for u, _ in honest] + [layout.flatten(attacker)])
    w, _ = task_aware_weights(rows, [4.0] * 4)
    assert float(w[3]) == 0.0 and all(0.9 * 4 < float(x) <= 4.0 for x in w[:3])  # never over its share
    # As if the attacker had sent nothing; the honest ones weigh 4 x their cosine to the median.
    expected = adam_step(ss[0], before.theta, [(u, float(x)) for (u, _), x in zip(honest, w[:3])])
    assert close_to(ss[0].coordinator.parameters(), expected)
    path = ss[0].coordinator.rundir.metrics_path
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), timeout_s=20, what="the round's record")
    assert '"zero_weight": 1.0' in path.read_text().splitlines()[0]


def test_cluster_updates_that_touch_no_or_several_clusters_or_a_missing_one_are_refused(inprocess_server) -> None:
    ss = sessions(inprocess_server, 4, clusters=2, cluster_warmup=0)
    s = ss[0]
    before = snapshot(s)
    both = {k: 0.01 * torch.ones_like(v) for k, v in s.params.items()}
    zeros = {k: torch.zeros_like(v) for k, v in s.params.items()}
    ghost = dict(direction(s, 1.0, 0, cluster=0, k=2))
    ghost[cluster_name(2, "net.0.weight")] = ghost.pop(cluster_name(1, "net.0.weight"))  # cluster 2 of 2
    for tensors, word in ((both, "clusters [0, 1]"), (zeros, "no cluster"), (ghost, "")):
        err = refused(lambda t=tensors: submit(s, stream(*encoded(s, t))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err) is Reason.BAD_TENSORS, err.details()
        assert word in err.details()
    err = refused(lambda: submit(s, stream(*encoded(s, direction(s, 1.0, 0, cluster=0, k=2), weight=5e3))))
    assert reason_of(err) is Reason.BAD_WEIGHT
    after = snapshot(s)
    assert (after.version, after.answered, after.counted) == (before.version, before.answered, before.counted)


def test_clusters_split_by_direction_and_the_split_survives_a_restart(inprocess_server) -> None:
    ss = sessions(inprocess_server, 4, clusters=2, cluster_warmup=0, rounds=3, checkpoint_every=1)
    c = ss[0].coordinator
    before = snapshot(ss[0])
    for i, s in enumerate(ss):  # before the split every client trains cluster 0 (the θ's are identical)
        assert submit(s, stream(*encoded(s, direction(s, 1.0 if i < 2 else -1.0, i, cluster=0, k=2)))).accepted
    wait_for(lambda: c.version != before.version, timeout_s=20, what="the round to close")
    path = c.rundir.metrics_path
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), timeout_s=20, what="the round's record")
    assert c.clusters.split_round == 0
    theta = split({k: v.clone() for k, v in c.parameters().items()}, 2)
    assert not torch.equal(theta[0]["net.0.weight"], theta[1]["net.0.weight"])
    record = c.rundir.metrics_path.read_text().splitlines()[0]
    assert '"cluster_members": {"c0": 0, "c1": 0, "c2": 1, "c3": 1}' in record, record
    # Round 1: three clients train cluster 0; c3 alone pushes cluster 1, which therefore stays as it was.
    ss = [session(s.server, s.client_id, s.run_id) for s in ss]
    version = c.version
    for i, s in enumerate(ss):
        tensors = direction(s, 1.0, 10 + i, cluster=0, k=2) if i < 3 else {
            k: 1e3 * v for k, v in direction(s, -1.0, 13, cluster=1, k=2).items()}
        assert submit(s, stream(*encoded(s, tensors))).accepted
    wait_for(lambda: c.version != version, timeout_s=20, what="round 1 to close")
    moved = split(c.parameters(), 2)
    assert torch.equal(moved[1]["net.0.weight"], theta[1]["net.0.weight"])
    assert not torch.equal(moved[0]["net.0.weight"], theta[0]["net.0.weight"])
    wait_for(lambda: len(c.rundir.metrics_path.read_text().splitlines()) == 2, timeout_s=20, what="round 1's record")
    kept = {k: v.clone() for k, v in c.parameters().items()}
    c.stop()
    resumed = Coordinator(build(FOUR | {"clusters": 2, "cluster_warmup": 0, "rounds": 3, "checkpoint_every": 1,
                                        "run_dir": str(c.config.run_dir), "port": 0, "poll_timeout_s": 1.0}))
    assert resumed.clusters.split_round == 0
    assert close_to(resumed.parameters(), kept)
