"""A failed or stopped coordinator is not a finished run: real processes, a real full disk, SIGTERM.

Clients of a coordinator that stops (on an error, or by SIGTERM in any phase) are answered
UNAVAILABLE, keep retrying, and finish the run with the coordinator restarted on the same
--run-dir. The full disk is a real tmpfs where the test may mount one (root), else a test-only hook.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_failures import FAST, _free_port, _rounds
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def _until(condition, what: str, *procs) -> None:  # type: ignore[no-untyped-def]
    """wait_for, failing at once if one of procs exits, and showing their output on failure."""
    def ready() -> bool:
        if any(p.proc.poll() is not None for p in procs):
            pytest.fail(f"a process exited while waiting for {what}:\n" + "\n----\n".join(p.output()[-3000:] for p in procs))
        return bool(condition())

    try:
        wait_for(ready, timeout_s=120, what=what)
    except BaseException:
        print("\n----\n".join(p.output()[-5000:] for p in procs))
        raise


def _clean_exit(output: str) -> None:
    assert "Traceback" not in output and "cannot schedule" not in output, output[-4000:]


def _mount_tmpfs(mount: Path) -> str | None:
    """Mount a 4 MiB tmpfs at mount; None on success, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else done.stderr.strip() or "mount failed"


def _fill(disk: Path) -> Path:
    """Write zeros until the file system is full (ENOSPC); returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (65536, 512):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def test_full_disk_stops_the_run_and_a_restart_finishes_it(processes, tmp_path: Path, monkeypatch) -> None:
    """The disk fills up during the run (a real 4 MiB tmpfs filled with zeros; without root, the
    test-only ENOSPC hook in server/checkpoint.py at round 4): the coordinator exits 1, its two
    clients keep retrying (UNAVAILABLE, not FINISHED), and the restarted coordinator finishes."""
    disk = tmp_path / "disk"
    why_not = _mount_tmpfs(disk)
    try:
        run_dir = disk / "run"
        flags = ["--port", str(_free_port()), "--rounds", "30", "--clients-per-round", "2", "--min-clients", "2",
                 *FAST]
        if why_not is not None:
            monkeypatch.setenv("FEDMETA_TEST_CHECKPOINT_ENOSPC_AT_ROUND", "4")
        server = processes.server(run_dir, *flags)
        monkeypatch.delenv("FEDMETA_TEST_CHECKPOINT_ENOSPC_AT_ROUND", raising=False)
        clients = [processes.client(server.port, f"c{i}", i, "--give-up-s", "120") for i in range(2)]
        wait_for(lambda: len(_rounds(run_dir)) >= 3, timeout_s=60, what="three rounds")
        filler = _fill(disk) if why_not is None else None
        code = server.wait(60)
        assert code == 1, server.output()
        assert "No space left on device" in server.output() and "run finished" not in server.output()
        _clean_exit(server.output())
        assert all(c.proc.poll() is None for c in clients), "a client took the failed run for a finished one"
        assert len(_rounds(run_dir)) < 30

        if filler is not None:
            filler.unlink()
        restarted = processes.server(run_dir, *flags)
        assert restarted.wait(180) == 0, restarted.output()
        assert "resumed run" in restarted.output()
        for c in clients:
            assert c.wait(60) == 0, c.output()
            assert "UNAVAILABLE" in c.output() and "refused this client" not in c.output()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds_completed"] == 30 and summary["clients_seen"] == 2
        assert [r["round"] for r in _rounds(run_dir)][-1] == 29
    finally:
        if why_not is None:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_sigterm_in_training_and_in_evaluation_then_resume(processes, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM while clients train, then again while the only client evaluates (a test hook makes
    the evaluation last 4 s): each time the coordinator exits 0 without a traceback and keeps its
    checkpoint; the client retries (UNAVAILABLE) and finishes with the third coordinator."""
    run_dir = tmp_path / "run"
    rounds = 40
    flags = ["--port", str(_free_port()), "--rounds", str(rounds), "--clients-per-round", "1", *FAST]
    server = processes.server(run_dir, *flags)
    monkeypatch.setenv("FEDMETA_TEST_EVAL_PAUSE_S", "4")
    client = processes.client(server.port, "c0", 0, "--give-up-s", "120")
    monkeypatch.delenv("FEDMETA_TEST_EVAL_PAUSE_S")
    _until(lambda: len(_rounds(run_dir)) >= 3, "three rounds", server, client)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.output()
    assert "SIGTERM received" in server.output()
    _clean_exit(server.output())
    assert (run_dir / "checkpoint" / "state.safetensors").exists() and client.proc.poll() is None

    second = processes.server(run_dir, *flags)
    _until(lambda: len(_rounds(run_dir)) >= rounds, "the training rounds", second, client)
    _until(lambda: "evaluating on" in client.output(), "the client to start evaluating", second, client)
    second.proc.send_signal(signal.SIGTERM)  # the client is in its 4 s evaluation
    assert second.wait(30) == 0, second.output()
    _clean_exit(second.output())
    assert not (run_dir / "summary.json").exists() and client.proc.poll() is None

    third = processes.server(run_dir, *flags)
    assert third.wait(120) == 0, third.output()
    assert client.wait(60) == 0, client.output()
    _clean_exit(client.output())
    # Whether the client saw UNAVAILABLE depends on where it was (a long-poll, or computing while a
    # coordinator stopped and the next one started on the same port); it was never refused.
    assert "refused this client" not in client.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds and summary["eval"]["clients"] == 1
