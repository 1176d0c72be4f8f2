"""A small run of benchmarks/load_clients.py: 32 concurrent protocol clients, every update counted exactly once."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.load_clients import RunSpec, one_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_32_concurrent_clients_every_update_counted_once(tmp_path: Path) -> None:
    """A real coordinator process and 32 clients in 2 processes, all sampled in each of 3 rounds.

    The clients' accepted submissions per round must equal metrics.jsonl's clients_answered, resent
    updates must come back as duplicates, and theta,
    recomputed from exactly those updates, must match the coordinator's parameter version after every
    round and its exported model bit for bit (an update counted twice or lost changes the SHA-256).
    """
    args = argparse.Namespace(algorithm="reptile", poll_timeout_s=10.0, max_workers=0, coordinator_env=[],
                              poll_ms=50.0, timeout_s=120.0, resend_every=4)
    result = one_run(RunSpec("load-32", clients=32, processes=2, rounds=3, round_deadline_s=30.0), args, tmp_path)
    once = result["exactly_once"]
    assert [(p["round"], p["clients_ok"], p["clients_answered"]) for p in once["per_round"]] == \
        [(r, 32, 32) for r in range(3)], once["per_round"]
    assert once["client_round_pairs_accepted_twice"] == 0
    # A quarter of the accepted updates are sent again (as after a lost reply): acknowledged, not counted.
    assert once["resends_acknowledged_as_duplicate"] == 3 * 32 // 4 and once["resends_counted_again"] == 0
    assert once["eval_ok"] == once["eval_clients_in_summary"] == 32
    assert result["theta"]["rounds_whose_version_matches"] == 3, result["theta"]
    assert result["theta"]["exported_equals_recomputed"], result["theta"]
    assert result["client_error_count"] == 0, result["client_errors"]
    assert result["checks"] == {"exactly_once": True, "theta_matches": True, "no_stall": True, "no_client_errors": True}


def test_coroutine_clients_sampled_per_round_every_update_counted_once(tmp_path: Path) -> None:
    """The 10,000-client benchmark's path, small: 60 coroutine clients (benchmarks/_aio_load_worker.py)
    in 2 processes, 12 sampled per round; the other 48 keep long-polling. Exactly once, θ replayed."""
    args = argparse.Namespace(algorithm="reptile", poll_timeout_s=10.0, max_workers=0, coordinator_env=[],
                              poll_ms=50.0, timeout_s=120.0, resend_every=4, worker="aio")
    result = one_run(RunSpec("aio-60", clients=60, processes=2, rounds=3, round_deadline_s=30.0, per_round=12),
                     args, tmp_path)
    once = result["exactly_once"]
    assert [(p["round"], p["clients_ok"], p["clients_answered"]) for p in once["per_round"]] == \
        [(r, 12, 12) for r in range(3)], once["per_round"]
    assert once["client_round_pairs_accepted_twice"] == 0 and once["resends_counted_again"] == 0
    assert result["theta"]["exported_equals_recomputed"], result["theta"]
    assert result["checks"] == {"exactly_once": True, "theta_matches": True, "no_stall": True,
                                "no_client_errors": True}, (result["checks"], result["client_errors"])
