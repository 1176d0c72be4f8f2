"""Run state (server/runstate.py): the resume check, a new run, records and checkpoint metadata."""

from __future__ import annotations

import re

import pytest

from fedmeta.server.config import OPTIONS
from fedmeta.server.runstate import RunState, check_resumable

RESUME_KEYS = tuple(o.field for o in OPTIONS if o.resume and o.field is not None)


def test_resuming_needs_the_same_settings() -> None:
    assert {"algorithm", "inner_lr", "eval_every", "eval_ways"} <= set(RESUME_KEYS)
    current = {k: 1 for k in RESUME_KEYS}
    check_resumable(dict(current), current, "runs/x")
    with pytest.raises(ValueError, match=re.escape("inner_lr: checkpoint 2, now 1")):
        check_resumable(current | {"inner_lr": 2}, current, "runs/x")
    old = {k: v for k, v in current.items() if k not in ("eval_every", "eval_ways")}  # before --eval-every
    check_resumable(old, current | {"eval_every": 0}, "runs/x")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_run_creates_its_directory_and_counts_wall_time_by_the_clock_passed_in(tmp_path) -> None:
    from fedmeta.common.aggregation import FlatLayout
    from fedmeta.common.algorithms import OuterConfig, get_algorithm
    from fedmeta.server.config import build
    from fedmeta.server.registry import Registry
    from fedmeta.server.rounds import Round, RoundsState

    config = build({"run_dir": str(tmp_path / "run"), "rounds": 2})
    clock = FakeClock()
    state = RunState(config, clock)
    outer = get_algorithm(config.run.algorithm).make_outer(OuterConfig(lr=0.1, rounds=2))
    registry = Registry(run_id="r", max_clients=4, forget_client_s=10.0, max_silent_rounds=2, lease_s=5.0)
    rounds = RoundsState()
    assert state.resume(numel=1, version_of=lambda t: "", outer=outer, registry=registry, rounds=rounds) is None
    assert (tmp_path / "run").is_dir() and rounds.next_round == 0
    clock.now += 7.5
    state.count_bytes(sent=10, received=3)
    rnd = Round(0, False, {"a", "b"}, 100.0, 110.0, "v", None, answered={"a"}, dropped={"c"})
    record = state.round_record(rnd, {"loss_post": 0.5}, lr=None, round_s=7.5, version="v1")
    assert record["wall_s"] == 7.5 and record["bytes_sent"] == 10 and record["bytes_received"] == 3
    assert record["clients_sampled"] == 3 and record["clients_answered"] == 1 and record["step_undone"] is True
    meta = state.meta(rounds=rounds, version="v1", clients={}, seen=2)
    assert meta["next_round"] == 0 and meta["clients_seen"] == 2 and meta["config"]["rounds"] == 2
