"""The status snapshot, its terminal view and the operator's actions, without sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmeta.common.proto import admin_pb
from fedmeta.server.clientstats import HISTORY, ClientStats
from fedmeta.server.config import build
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.errors import Rejected
from fedmeta.server.status import MAX_PAGE, snapshot
from fedmeta.server.status_view import render, sparkline
from fedmeta.server.steering import read_revoked


def test_sparkline_scales_from_min_to_max_and_shows_nan_as_a_gap() -> None:
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, float("nan"), 1.0]) == "▁ ▁"
    assert sparkline([float("nan")]) == ""
    assert len(sparkline([float(i) for i in range(500)], 50)) == 50


def test_terminal_view_escapes_peer_text_and_fits_80_columns() -> None:
    s = admin_pb.GetStatusResponse(clients_total=1)
    s.run.run_id, s.run.rounds_total, s.run.phase = "r", 10, "training"
    c = s.clients.add(client_id="site\x1b[2Jx", state="idle", device="cpu")
    c.refusals.add(reason="BAD_VALUES", count=3, last_message="boom\x1b]0;owned\x07")
    s.refusals.add(reason="WRONG_RUN", count=1, last_message="run '\x1b[31m' " + "x" * 500)
    s.rounds.add(round=0, meta_loss=1.0)
    s.rounds.add(round=1, meta_loss=0.5)
    text = render(s)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "meta-loss" in text and "BAD_VALUES x3" in text


def test_client_stats_are_bounded() -> None:
    stats = ClientStats(max_clients=2)
    for i in range(10):
        stats.joined(f"c{i}")
    stats.refused("never-joined", "NOT_JOINED", "x" * 10_000)
    copied = stats.copy([f"c{i}" for i in range(10)] + ["never-joined"])
    assert sorted(copied["clients"]) == ["c6", "c7", "c8", "c9"]  # 2 x --max-clients, oldest forgotten
    assert copied["refusals"] == [("NOT_JOINED", 1, "x" * 200 + "... (10000 characters)")]
    for r in range(HISTORY + 50):
        stats.observe({"round": r, "meta_loss": 1.0})
    assert len(stats.copy([])["rounds"]) == HISTORY


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    return Coordinator(build({"run_dir": str(tmp_path / "run"), "rounds": 3, "clients_per_round": 2}))


def test_snapshot_pages_are_capped(coordinator: Coordinator) -> None:
    for i in range(MAX_PAGE + 5):
        coordinator.join(f"c{i:04d}", device="cpu", num_tasks=1)
    s = snapshot(coordinator, limit=10_000)
    assert len(s.clients) == MAX_PAGE and s.clients_total == MAX_PAGE + 5
    tail = snapshot(coordinator, offset=MAX_PAGE, limit=10)
    assert [c.client_id for c in tail.clients] == [f"c{i:04d}" for i in range(MAX_PAGE, MAX_PAGE + 5)]
    assert s.run.phase == "waiting" and s.run.eta_s == -1.0


def test_actions_validate_like_their_flags_and_revocation_is_persisted(coordinator: Coordinator,
                                                                       tmp_path: Path) -> None:
    steering = coordinator.steering
    with pytest.raises(ValueError, match="--min-clients: expected at most --clients-per-round"):
        steering.set_quorum(3)
    with pytest.raises(ValueError, match="--round-deadline-s"):
        steering.set_deadline(float("nan"))
    with pytest.raises(ValueError):
        steering.revoke("bad id with spaces")
    coordinator.join("mallory", device="cpu", num_tasks=1)
    steering.revoke("mallory")
    with pytest.raises(Rejected, match="revoked"):
        coordinator.join("mallory", device="cpu", num_tasks=1)
    assert read_revoked(tmp_path / "run") == {"mallory"}
    assert snapshot(coordinator).clients[0].state == "revoked"
    (tmp_path / "run" / "revoked.json").write_text('{"revoked": "mallory"}')
    with pytest.raises(ValueError, match="revoked.json is unreadable"):
        read_revoked(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "admin.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log] == ["revoke"] and log[0]["arguments"] == {"client_id": "mallory"}
