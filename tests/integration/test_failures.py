"""Failures with real processes: a client killed mid-run, a coordinator killed and restarted."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

FAST = ["--tasks-per-client", "4", "--eval-tasks-per-client", "5", "--eval-queries", "20"]


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_client_does_not_stop_the_run(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "40", "--clients-per-round", "3", "--min-clients", "2",
                              "--round-deadline-s", "1", "--algorithm", "fomaml", *FAST)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(3)]
    wait_for(lambda: len(_rounds(run_dir)) >= 3, timeout_s=60, what="three rounds")
    clients[0].proc.send_signal(signal.SIGKILL)
    assert server.wait(180) == 0, server.output()
    for c in clients[1:]:
        assert c.wait(30) == 0, c.output()
    records = _rounds(run_dir)
    assert [r["round"] for r in records] == list(range(40))
    assert any(r["clients_answered"] == 2 for r in records), "no round closed without the killed client"
    assert records[-1]["clients_answered"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 40
    assert summary["eval"]["clients"] == 2


def test_coordinator_killed_and_restarted_resumes(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = str(_free_port())
    flags = ["--port", port, "--rounds", "60", "--clients-per-round", "2", "--min-clients", "2", *FAST]
    server = processes.server(run_dir, *flags)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
    wait_for(lambda: len(_rounds(run_dir)) >= 5, timeout_s=60, what="five rounds")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    before = _rounds(run_dir)
    assert (run_dir / "checkpoint" / "state.safetensors").exists()

    restarted = processes.server(run_dir, *flags)
    assert restarted.wait(180) == 0, restarted.output()
    assert "resumed run" in restarted.output()
    for c in clients:
        assert c.wait(60) == 0, c.output()
    rounds = [r["round"] for r in _rounds(run_dir)]
    assert rounds == sorted(set(rounds)), "a round was counted twice"
    assert rounds[-1] == 59 and len(rounds) >= 59
    assert rounds[: len(before)] == [r["round"] for r in before]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 60
    assert summary["clients_seen"] == 2


def test_client_exits_cleanly_on_sigterm(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "1000", "--clients-per-round", "1", *FAST)
    client = processes.client(server.port, "c0", 0)
    wait_for(lambda: len(_rounds(run_dir)) >= 2, timeout_s=60, what="two rounds")
    client.proc.send_signal(signal.SIGTERM)
    assert client.wait(20) == 0, client.output()
    wait_for(lambda: "client c0 left" in server.output(), timeout_s=10, what="the coordinator to see the client leave")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.output()
    assert "resumes the run" in server.output()


def test_finished_run_and_changed_settings_are_refused(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "2", "--clients-per-round", "1", *FAST)
    client = processes.client(server.port, "c0", 0)
    assert server.wait(60) == 0 and client.wait(30) == 0

    def start(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server", "--run-dir", str(run_dir), "--port", "0", *flags],
                              capture_output=True, text=True, timeout=60)

    finished = start("--rounds", "2", "--clients-per-round", "1", *FAST)
    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1 and "finished run" in finished.stderr

    (run_dir / "summary.json").unlink()  # as if the coordinator died before the evaluation round
    changed = start("--rounds", "5", "--clients-per-round", "1", *FAST)
    assert changed.returncode == 2
    assert changed.stderr.count("\n") == 1
    assert "rounds: checkpoint 2, now 5" in changed.stderr


def test_diverging_run_stops_with_a_clear_error(tmp_path: Path) -> None:
    """--local-clients: when every client fails, the coordinator exits 1 quoting a client's error."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "server", "--local-clients", "2", "--rounds", "5", "--inner-lr", "1e30",
         "--run-dir", str(run_dir), "--no-progress", *FAST],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmeta-server: error: every local client exited")
    assert "inner loop diverged" in last
    assert not (run_dir / "metrics.jsonl").exists()  # no round was closed with bad updates


def test_paused_client_is_dropped_then_carries_on(processes, tmp_path: Path) -> None:
    """SIGSTOP a client past its lease: rounds close without it; after SIGCONT it takes part again."""
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "600", "--clients-per-round", "3", "--min-clients", "2",
                              "--round-deadline-s", "1", "--algorithm", "fomaml", *FAST)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(3)]
    wait_for(lambda: len(_rounds(run_dir)) >= 3, timeout_s=60, what="three rounds")
    clients[0].proc.send_signal(signal.SIGSTOP)
    paused_at = len(_rounds(run_dir))
    # The lease is 2 x poll timeout (1 s) + 5 s: after it, rounds close with the two live clients.
    wait_for(lambda: sum(r["clients_answered"] == 2 for r in _rounds(run_dir)[paused_at:]) >= 5,
             timeout_s=60, what="rounds closed without the paused client")
    clients[0].proc.send_signal(signal.SIGCONT)
    resumed_at = len(_rounds(run_dir))
    wait_for(lambda: any(r["clients_answered"] == 3 for r in _rounds(run_dir)[resumed_at:]),
             timeout_s=60, what="the resumed client to take part again")
    assert server.wait(180) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    rounds = [r["round"] for r in _rounds(run_dir)]
    assert rounds == list(range(600))
