"""Failures with real processes: clients killed or paused, a coordinator killed (also mid-checkpoint) and restarted."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from fedmeta.server import checkpoint
from fedmeta.server.registry import HANGUP_GRACE_S
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


def _live_clients(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return int(float(next(line.split()[1] for line in lines if line.startswith("fedmeta_clients_live "))))


def test_a_client_killed_while_it_long_polls_stops_being_live_within_the_grace(processes, tmp_path: Path) -> None:
    """A long --poll-timeout-s (a 245 s lease here) does not keep a dead client live: its long-poll's
    cancellation ends it HANGUP_GRACE_S later."""
    pytest.importorskip("prometheus_client")
    server = processes.server(tmp_path / "run", "--poll-timeout-s", "120", "--rounds", "5", "--clients-per-round", "2",
                              "--min-clients", "2", "--metrics-port", "0", *FAST)
    port = wait_for(lambda: next((int(line.rsplit(":", 1)[1].split("/")[0]) for line in server.lines
                                  if line.startswith("metrics on http://127.0.0.1:")), None),
                    timeout_s=60, what="the metrics endpoint")
    client = processes.client(server.port, "c0", 0)  # alone, it long-polls: the round needs 2
    wait_for(lambda: _live_clients(port) == 1 or None, timeout_s=60, interval_s=0.5, what="the client to join")
    # Live from its Join; its long-poll follows at once. The coordinator exposes no "polling" signal, so
    # a short pause lets the poll start: killed before it, the client would stay live (this fails, never passes).
    time.sleep(1.0)
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: _live_clients(port) == 0 or None, timeout_s=HANGUP_GRACE_S + 20, interval_s=0.5,
             what="the killed client to stop being live")
    assert time.monotonic() - killed < HANGUP_GRACE_S + 20 < 245
    assert server.proc.poll() is None, server.output()


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
        return subprocess.run([sys.executable, "-m", "fedmeta.server", "--run-dir", str(run_dir), "--port", "0", *flags],
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
        [sys.executable, "-m", "fedmeta.server", "--local-clients", "2", "--rounds", "5", "--inner-lr", "1e30",
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


def test_coordinator_killed_while_writing_a_checkpoint_keeps_the_previous_one(processes, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL while the new checkpoint is a temporary file: the previous one loads, and the run resumes from it."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoint"
    tmp_file = ckpt_dir / f".{checkpoint.FILENAME}.tmp"
    flags = ["--port", str(_free_port()), "--rounds", "8", "--clients-per-round", "2", "--min-clients", "2", *FAST]
    # Test-only hook (server/checkpoint.py): the coordinator sleeps between writing the temporary
    # file and renaming it whenever a previous checkpoint exists, i.e. from the second checkpoint on.
    monkeypatch.setenv("FEDMETA_TEST_CHECKPOINT_PAUSE_S", "300")
    server = processes.server(run_dir, *flags)
    monkeypatch.delenv("FEDMETA_TEST_CHECKPOINT_PAUSE_S")
    clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
    # Round 0's record follows the first checkpoint (not paused), so a temporary file seen after it is the second's.
    wait_for(lambda: _rounds(run_dir) and tmp_file.exists(), timeout_s=90,
             what="the second checkpoint's temporary file")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)

    # The kill left the new state unrenamed next to the previous checkpoint (written after round 0).
    assert [r["round"] for r in _rounds(run_dir)] == [0]  # round 1's record follows its checkpoint
    with safe_open(str(tmp_file), framework="pt") as f:
        assert json.loads((f.metadata() or {})["fedmeta"])["next_round"] == 2
    previous = checkpoint.load(ckpt_dir)
    assert previous is not None
    assert previous.meta["next_round"] == 1
    assert previous.meta["version"] == _rounds(run_dir)[0]["version"]
    assert previous.theta.isfinite().all() and previous.theta.numel() == 1761  # the sinusoid MLP 1-40-40-1
    # As if the kill had come in the middle of the write: only half of the temporary file is on disk.
    with open(tmp_file, "r+b") as f:
        f.truncate(tmp_file.stat().st_size // 2)
    assert checkpoint.load(ckpt_dir).meta["next_round"] == 1  # type: ignore[union-attr]

    restarted = processes.server(run_dir, *flags)
    assert restarted.wait(180) == 0, restarted.output()
    assert "from its checkpoint: next round 1 of 8" in restarted.output()
    for c in clients:
        assert c.wait(60) == 0, c.output()
    rounds = [r["round"] for r in _rounds(run_dir)]
    assert rounds == list(range(8)), f"rounds in metrics.jsonl after the resume: {rounds}"
    assert not tmp_file.exists()
    final = checkpoint.load(ckpt_dir)
    assert final is not None and final.meta["next_round"] == 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 8


def _blocked(proc: subprocess.Popen[str], quiet_s: float = 0.5) -> Callable[[], bool]:
    """A condition: proc has used no CPU for quiet_s (a client blocked in its WaitForAssignment long-poll)."""
    p = psutil.Process(proc.pid)
    last: list[float] = [-1.0, 0.0]  # cpu seconds, when they last changed

    def check() -> bool:
        cpu, now = sum(p.cpu_times()[:2]), time.monotonic()
        if cpu != last[0]:
            last[:] = [cpu, now]
            return False
        return now - last[1] >= quiet_s

    return check


def test_client_paused_holding_an_assignment_has_its_late_update_refused(processes, tmp_path: Path) -> None:
    """SIGSTOP a client while its long-poll is pending; the coordinator assigns it round 0 while it is stopped.

    Round 0 (and the next) close at their deadline with the two others. After SIGCONT the client computes
    round 0 from the stale assignment, its update is refused with FAILED_PRECONDITION and not counted, and
    it then trains in a later round.
    """
    run_dir = tmp_path / "run"
    # A 60 s long-poll (the client's call deadline is 70 s) so the stopped client's pending poll is what
    # receives round 0's assignment; its lease (2 x 60 + 5 s) keeps it sampled, so rounds wait for the deadline.
    server = processes.server(run_dir, "--rounds", "12", "--clients-per-round", "3", "--min-clients", "2",
                              "--round-deadline-s", "2", "--poll-timeout-s", "60", "--algorithm", "fomaml", *FAST)
    paused = processes.client(server.port, "c0", 0)
    try:
        # No round opens with one client: once joined and idle, c0 is blocked in its first WaitForAssignment.
        wait_for(lambda: "joined run" in paused.output(), timeout_s=60, what="c0 to join")
        wait_for(_blocked(paused.proc), timeout_s=30, what="c0 to block in its long-poll")
        paused.proc.send_signal(signal.SIGSTOP)
        others = [processes.client(server.port, f"c{i}", i) for i in (1, 2)]
        wait_for(lambda: len(_rounds(run_dir)) >= 2, timeout_s=60, what="two rounds closed while c0 is stopped")
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "work refused" in paused.output(), timeout_s=30, what="c0's late update to be refused")
    assert server.wait(180) == 0, server.output()
    for c in (paused, *others):
        assert c.wait(30) == 0, c.output()

    refusal = re.search(r"work refused \(update for round (\d+) refused: (the current round is \d+|none is open)\)",
                        paused.output())
    assert refusal is not None and int(refusal[1]) == 0, paused.output()
    assert "update from 'c0' refused (FAILED_PRECONDITION): update for round 0 refused" in server.output()
    records = _rounds(run_dir)
    assert [r["round"] for r in records] == list(range(12))
    assert records[0]["clients_sampled"] == 3  # c0 was assigned round 0 ...
    assert records[0]["clients_answered"] == records[1]["clients_answered"] == 2  # ... and its late update not counted
    assert any(r["clients_answered"] == 3 for r in records[2:]), "c0 did not train after the refusal"
    trained = re.search(r"the run is finished after (\d+) rounds trained here", paused.output())
    assert trained is not None and int(trained[1]) >= 1


def test_a_slow_client_keeps_its_lease_by_heartbeats(processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose every step outlasts its lease is waited for, not replaced like a dead one.

    Lease: 2 x poll timeout (0.5 s) + 5 s = 6 s; each training step takes 8 s (test-only hook in
    client/worker.py); the round deadline is 2 s. Without heartbeats the coordinator would drop the
    client at 6 s and refuse its update at 8 s.
    """
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "2", "--clients-per-round", "1", "--min-clients", "1",
                              "--round-deadline-s", "2", "--poll-timeout-s", "0.5", *FAST)
    monkeypatch.setenv("FEDMETA_TEST_COMPUTE_PAUSE_S", "8")
    client = processes.client(server.port, "slow", 0)
    monkeypatch.delenv("FEDMETA_TEST_COMPUTE_PAUSE_S")
    assert server.wait(120) == 0, server.output()
    assert client.wait(30) == 0, client.output()
    records = _rounds(run_dir)
    assert [(r["round"], r["clients_answered"]) for r in records] == [(0, 1), (1, 1)]
    assert all(r["round_s"] > 7.5 for r in records)  # the rounds really waited for the slow steps
    assert "work refused" not in client.output()
    assert "dropped unreachable ['slow']" not in server.output()
    assert "deadline passed" in server.output()  # the deadline did pass: the lease, not luck, kept it
