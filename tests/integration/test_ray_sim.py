"""fedmeta-sim on a real two-node Ray cluster (ray.cluster_utils.Cluster on this machine) against a
real coordinator process: 200 virtual clients, 20 rounds, actors on both nodes, one actor killed
mid-run and replaced, every accepted update counted exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Process, _spawn, wait_for

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.integration
NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}
SIM = ["-c", "import sys; from fedmeta.client.sim import main; sys.exit(main())"]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """Two Ray nodes of one CPU each: two 1-CPU actors can only be placed one per node. Their
    client steps take 0.3 s more (the nodes' processes inherit this environment), so that the 20
    rounds outlast an actor's replacement."""
    monkeypatch.setenv("FEDMETA_TEST_COMPUTE_PAUSE_S", "0.3")
    c = Cluster(initialize_head=True, connect=False, head_node_args={**NODE, "include_dashboard": False})
    c.add_node(**NODE)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "clients_answered" in r]


def _killed(children: list[Process]) -> None:
    for p in children:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait()


def test_virtual_clients_on_two_nodes_survive_a_killed_actor(processes: Any, cluster: Cluster,
                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "20", "--clients-per-round", "10", "--min-clients", "1",
                              "--round-deadline-s", "3", "--poll-timeout-s", "5", "--joins-per-s", "1000",
                              "--max-workers", "512", "--eval-tasks-per-client", "5", "--shards", "200",
                              "--algorithm", "fomaml")
    report_path = tmp_path / "report.json"
    sim = _spawn([*SIM, "--server", f"127.0.0.1:{server.port}", "--ray-address", cluster.address,
                  "--virtual-clients", "200", "--clients-per-round", "10", "--cpus-per-actor", "1",
                  "--give-up-s", "60", "--report", str(report_path)])
    try:
        def placed() -> dict[int, int] | None:
            pids = {int(m[1]): int(m[2]) for m in re.finditer(r"^actor (\d+): .* pid (\d+)$", sim.output(), re.M)}
            if sim.proc.poll() is not None:
                pytest.fail(f"fedmeta-sim exited with {sim.proc.returncode}:\n{sim.output()[-4000:]}")
            return pids if len(pids) == 2 else None

        pids = wait_for(placed, timeout_s=180, interval_s=0.2, what="both actors to be placed")
        wait_for(lambda: len(_rounds(run_dir)) >= 4, timeout_s=180, interval_s=0.1, what="four rounds")
        assert len(_rounds(run_dir)) < 20, "the run ended before the kill: it would not test a replacement"
        os.kill(pids[1], signal.SIGKILL)  # actor 1 dies in the middle of the run, its clients with it
        code = sim.wait(timeout_s=300)
        assert code == 0, sim.output()[-4000:]
        assert server.wait(timeout_s=120) == 0, server.output()[-4000:]
    finally:
        _killed([sim])
    out = sim.output()
    assert "actor 1 (replacement 1): 100 virtual clients vc-100..vc-199" in out, out[-4000:]
    assert "memory estimate: fomaml (first order)" in out
    report = json.loads(report_path.read_text())
    assert report["replaced"] >= 1
    nodes = {p["node"] for p in report["placements"] if p["incarnation"] == 0}
    assert len(nodes) == 2 and set(report["by_node"]) >= nodes, report["by_node"]  # both nodes contributed
    assert all(report["by_node"][n] > 0 for n in nodes)
    # Exactly once: per round, what the clients saw accepted is what the coordinator counted, bar the
    # updates in flight when the actor was killed (sent, never answered: the coordinator may have taken them).
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(20))
    accepted = {int(k): v for k, v in report["accepted_per_round"].items()}
    doubt = {int(k): v for k, v in report["in_doubt_per_round"].items()}
    for r in rounds:
        seen = accepted.get(r["round"], 0)
        assert seen <= r["clients_answered"] <= seen + doubt.get(r["round"], 0), (r, seen, doubt)
    assert report["counted_twice"] == []
    assert sum(accepted.values()) >= sum(r["clients_answered"] for r in rounds) - sum(doubt.values())
    assert report["accepted"].get("evaluation", 0) > 0  # the final evaluation ran on virtual clients too
    assert sum(report["by_actor"].get("1.1", {}).values()) > 0, report["by_actor"]  # the replacement's clients rejoined


def test_an_unreachable_coordinator_is_one_line_and_exit_1() -> None:
    import subprocess

    done = subprocess.run([sys.executable, *SIM, "--server", "127.0.0.1:1", "--give-up-s", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmeta-sim: error: cannot reach the coordinator at 127.0.0.1:1 (--server)"), done.stderr
