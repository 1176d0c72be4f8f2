"""Many virtual clients in one process (client/virtual.py, no Ray): the same worker code on threads
against a real in-process coordinator, a bound on how many compute at once, and a ledger whose
accepted updates match the coordinator's counts."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from fedmeta.client.sim_plan import VirtualClient
from fedmeta.client.virtual import HostSettings, VirtualClientHost
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def test_a_host_runs_its_clients_to_the_end_one_computing_at_a_time(inprocess_server: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMETA_TEST_COMPUTE_PAUSE_S", "0.1")  # steps long enough to overlap without the slot
    s = inprocess_server(rounds=3, clients_per_round=4, eval_tasks_per_client=3, round_deadline_s=30.0, shards=6)
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def record(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    clients = [VirtualClient(f"vc-{i}", i, i) for i in range(6)]
    host = VirtualClientHost(clients, HostSettings(server=f"127.0.0.1:{s.port}", computing=1, give_up_s=10.0),
                             record=record, node="here")
    info = host.start()
    assert info["clients"] == 6
    wait_for(lambda: host.status()["running"] == 0, timeout_s=120, interval_s=0.05, what="every virtual client to end")
    status = host.status()
    assert status["finished"] == 6 and status["failed"] == 0, status
    assert status["peak_computing"] == 1  # four sampled at once, one slot: they queued
    run_dir = Path(s.coordinator.config.run_dir)
    rounds = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "clients_answered" in r]
    accepted = [e for e in events if e["phase"] == "answer" and e["kind"] == "train" and e["accepted"]
                and not e["duplicate"]]
    assert len(rounds) == 3
    assert len(accepted) == sum(r["clients_answered"] for r in rounds) > 0
    assert {e["node"] for e in events} == {"here"}
    assert any(e["kind"] == "evaluation" and e["accepted"] for e in events if e["phase"] == "answer")
