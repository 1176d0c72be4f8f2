"""fedmeta-sim's flags, plan, memory estimate and report (client/sim_plan.py, client/sim_report.py): no Ray."""

from __future__ import annotations

import pytest

from fedmeta.client import sim
from fedmeta.client.sim_plan import (BASE_BYTES, PER_CLIENT_BYTES, SimConfig, actor_count, concurrency, estimate, split,
                                     virtual_clients)
from fedmeta.client.sim_report import summarize


@pytest.mark.parametrize(("flags", "message"), [
    (["--virtual-clients", "0"], "--virtual-clients: expected a value >= 1, got 0"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor: expected a value >= 0, got -1.0"),
    (["--gpus-per-actor", "1.5"], "--gpus-per-actor: above 1 it must be a whole number"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor: expected a positive number, got 0.0"),
    (["--actors", "5", "--virtual-clients", "3"], "--actors: 5 actors for 3 virtual clients"),
    (["--memory-per-actor-mb", "-2"], "--memory-per-actor-mb: expected a value >= 0, got -2"),
    (["--id-prefix", "a b"], "--id-prefix: expected 1-64 characters"),
    (["--ray-address", " "], "--ray-address: expected an address"),
])
def test_a_bad_flag_is_one_line_naming_it(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        sim.main(["--server", "127.0.0.1:50051", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedmeta-sim: error: {message}"), err


def test_a_server_without_a_port_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sim.main(["--server", "coordinator"])
    assert "--server: expected HOST:PORT" in capsys.readouterr().err


def test_virtual_clients_are_partitioned_like_local_clients_and_each_hosted_once() -> None:
    config = SimConfig(server="h:1", virtual_clients=10, first_index=100, id_prefix="vc")
    clients = virtual_clients(config)
    assert [(c.client_id, c.data_seed, c.shard) for c in clients[:2]] == [("vc-100", 100, 100), ("vc-101", 101, 101)]
    shares = split(clients, 3)
    assert [len(s) for s in shares] == [3, 3, 4]
    assert [c for s in shares for c in s] == clients


def test_actors_and_compute_slots_are_derived_from_the_cluster() -> None:
    config = SimConfig(server="h:1", virtual_clients=1000, clients_per_round=50, cpus_per_actor=2)
    assert actor_count(config, {"CPU": 9.0}) == 4
    assert concurrency(config, 4) == 13  # ceil(50 / 4)
    gpu = SimConfig(server="h:1", virtual_clients=1000, gpus_per_actor=0.25)
    assert actor_count(gpu, {"CPU": 64.0, "GPU": 2.0}) == 8
    with pytest.raises(ValueError, match="--gpus-per-actor: the cluster has 0 GPUs"):
        actor_count(gpu, {"CPU": 64.0})
    with pytest.raises(ValueError, match="--cpus-per-actor: the cluster has 1 CPUs"):
        actor_count(config, {"CPU": 1.0})
    assert actor_count(SimConfig(server="h:1", virtual_clients=3), {"CPU": 16.0}) == 3


def test_second_order_clients_reserve_more_memory_and_grow_with_inner_steps() -> None:
    p = 1_000_000
    fomaml = [estimate("fomaml", p, k, hosted=100, computing=4).total_bytes for k in (1, 5)]
    maml = [estimate("maml", p, k, hosted=100, computing=4).total_bytes for k in (1, 5)]
    assert fomaml[0] == fomaml[1]  # first order: the step count does not change the peak
    assert maml[1] > maml[0] > fomaml[0]
    e = estimate("reptile", p, 1, hosted=100, computing=4)
    assert e.total_bytes == BASE_BYTES + 100 * (PER_CLIENT_BYTES + 2 * 4 * p) + 4 * 3 * 4 * p
    assert "reptile (first order)" in e.describe() and "second order" in estimate("metacurvature", p, 1, hosted=1,
                                                                                      computing=1).describe()


def _event(client: str, rnd: int, phase: str, **kw: object) -> dict[str, object]:
    return {"client": client, "round": rnd, "kind": "train", "phase": phase, "node": "n1", "actor": 0,
            "incarnation": 0} | kw


def test_the_report_separates_accepted_duplicate_refused_and_in_doubt_updates() -> None:
    events = [
        _event("a", 0, "submit"), _event("a", 0, "answer", accepted=True, duplicate=False),
        _event("b", 0, "submit"), _event("b", 0, "answer", accepted=False, duplicate=False),  # refused
        _event("c", 0, "submit"),  # its host died before the answer: in doubt
        _event("a", 1, "submit", node="n2", incarnation=1), _event("a", 1, "answer", accepted=True, duplicate=True,
                                                                   node="n2", incarnation=1),
        _event("d", 1, "submit", node="n2"), _event("d", 1, "answer", accepted=True, duplicate=False, node="n2"),
        _event("d", 1, "submit", node="n2"), _event("d", 1, "answer", accepted=True, duplicate=False, node="n2"),
    ]
    r = summarize(SimConfig(server="h:1"), events, [], [0, 1], set())
    assert r.accepted_per_round == {0: 1, 1: 1}
    assert r.in_doubt_per_round == {0: 1}
    assert r.duplicates == 1
    assert r.counted_twice == [("d", 1, "train")]  # what the exactly-once check exists to catch
    assert r.by_node == {"n1": 1, "n2": 1}
    assert r.replaced == 1


def test_every_algorithm_has_a_memory_factor() -> None:
    from fedmeta.client.sim_plan import STEP_FACTORS
    from fedmeta.common.algorithms import ALGORITHMS

    assert set(STEP_FACTORS) == set(ALGORITHMS)
