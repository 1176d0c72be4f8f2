"""Watching and steering a live run with real coordinator and client processes: the status API,
fedmeta-status and fedmeta-admin, every action (a revoked client's in-flight update is refused;
a stopped run exports, resumes and finishes)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from fedmeta.common.proto import admin_pb, admin_pb_grpc, pb, pb_grpc
from fedmeta.server import status_cli
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

TOKEN = "0123456789abcdef" * 4
FAST = ["--tasks-per-client", "2", "--eval-tasks-per-client", "2", "--eval-queries", "10", "--eval-every", "0"]


def _flags(token_file: Path, per_round: int) -> list[str]:
    return ["--rounds", "60", "--clients-per-round", str(per_round), "--min-clients", "2", "--round-deadline-s", "30",
            "--admin-token-file", str(token_file), *FAST]


def _status(stub: admin_pb_grpc.AdminStub) -> admin_pb.GetStatusResponse:
    return stub.GetStatus(admin_pb.GetStatusRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=20)


def _client(s: admin_pb.GetStatusResponse, cid: str) -> admin_pb.ClientStatus | None:
    return next((c for c in s.clients if c.client_id == cid), None)


def _admin(port: int, token_file: Path, *action: str, capsys: pytest.CaptureFixture[str]) -> str:
    code = status_cli.admin_main(["--server", f"127.0.0.1:{port}", "--admin-token-file", str(token_file), *action])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_status_and_every_admin_action_during_a_live_run(processes, tmp_path: Path, monkeypatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, *_flags(token_file, 3))
    port = server.port
    for i, cid in enumerate(["a", "b"]):
        processes.client(port, cid, i)
    monkeypatch.setenv("FEDMETA_TEST_COMPUTE_PAUSE_S", "3")
    victim = processes.client(port, "victim", 2)
    monkeypatch.delenv("FEDMETA_TEST_COMPUTE_PAUSE_S")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = admin_pb_grpc.AdminStub(channel)

    # Round 0 samples all three and waits for the slow victim: revoke it while it computes.
    def victim_computing() -> bool:
        s = _status(stub)
        v = _client(s, "victim")
        return v is not None and v.state == "training" and s.run.open_round == 0 and s.run.open_round_age_s > 1.0
    wait_for(victim_computing, timeout_s=90, interval_s=0.1, what="the victim to compute round 0")
    assert "revoked" in _admin(port, token_file, "revoke", "victim", capsys=capsys)
    refused = "revoked by the coordinator's operator: its update for round 0 is refused"
    wait_for(lambda: refused in victim.output(), timeout_s=60, what="the victim's update to be refused")
    s = _status(stub)
    v = _client(s, "victim")
    assert v is not None and v.state == "revoked" and s.run.clients_revoked == 1
    assert [r.reason for r in v.refusals] == ["NOT_ALLOWED"] and v.refusals[0].count >= 1  # its update, heartbeats

    # Two clients left of three per round: rounds wait the 30 s deadline to open, until it is shortened.
    assert "0.3 s" in _admin(port, token_file, "set-deadline", "0.3", capsys=capsys)
    wait_for(lambda: _status(stub).run.rounds_done >= 3, timeout_s=60, what="rounds under the new deadline")

    assert "paused" in _admin(port, token_file, "pause", capsys=capsys)
    paused = wait_for(lambda: (s := _status(stub)).run.phase == "paused" and s, timeout_s=30, what="the pause")
    assert "-> 1 clients" in _admin(port, token_file, "set-quorum", "1", capsys=capsys)
    still = _status(stub)
    assert still.run.phase == "paused" and still.run.rounds_done == paused.run.rounds_done
    assert still.run.min_clients == 1 and still.run.round_deadline_s == pytest.approx(0.3)
    # The one-shot terminal view during the run: a table of clients and a meta-loss sparkline.
    assert status_cli.status_main(["--server", f"127.0.0.1:{port}", "--admin-token-file", str(token_file)]) == 0
    view = capsys.readouterr().out
    assert "paused" in view and "meta-loss" in view and "victim" in view and "revoked" in view
    assert all(len(line) <= 80 for line in view.splitlines())
    _admin(port, token_file, "resume", capsys=capsys)
    wait_for(lambda: _status(stub).run.rounds_done > still.run.rounds_done, timeout_s=30, what="rounds after resume")

    assert "stopping" in _admin(port, token_file, "stop", capsys=capsys)
    assert server.wait(60) == 0, server.output()
    assert "stopped by its operator" in server.output()
    assert (run_dir / "checkpoint" / "state.safetensors").exists() and (run_dir / "model" / "model.safetensors").exists()
    assert not (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "revoked.json").read_text()) == {"revoked": ["victim"]}
    actions = [json.loads(line)["action"] for line in (run_dir / "admin.jsonl").read_text().splitlines()]
    assert actions == ["revoke", "set-deadline", "pause", "set-quorum", "resume", "stop"]
    channel.close()

    # The stopped run resumes on the same port and finishes: clients a and b, retrying all along,
    # reconnect by themselves; the victim stays revoked.
    resumed = processes.server(run_dir, *_flags(token_file, 2), "--port", str(port))
    with grpc.insecure_channel(f"127.0.0.1:{resumed.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(ch).Join(pb.JoinRequest(client_id="victim", protocol_version=1), timeout=20)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _client(_status(admin_pb_grpc.AdminStub(ch)), "victim").state == "revoked"  # type: ignore[union-attr]
    wait_for(lambda: (run_dir / "summary.json").exists(), timeout_s=120, what="the resumed run to finish")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 60 and summary["clients_seen"] == 3
    assert victim.wait(30) != 0  # a revoked client stops; a and b finish
