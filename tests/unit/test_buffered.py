"""The buffered schedule (server/buffered.py): decisions with a fake clock, and the staleness weighting
as the coordinator applies it (a Coordinator object, not started: no sockets, no threads, no sleeps)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from fedmeta.common.aggregation import FlatLayout, WeightedMean
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.codec import encode
from fedmeta.common.refusal import Reason
from fedmeta.server import buffered
from fedmeta.server.admission import UpdateMeta
from fedmeta.server.buffered import (
    Assigned, Buffer, BufferedState, BufferPolicy, Drop, Step, accept, apply_assignment, check_staleness,
    check_update, decide, is_duplicate, plan_assignment, staleness_weight,
)
from fedmeta.server.config import build
from fedmeta.server.coordinator import Action, Coordinator
from fedmeta.server.errors import Rejected
from fedmeta.server.round_thread import RoundThread
from fedmeta.server.rounds import Clients, Open, Policy, RoundsState, Wait

GRAD = UpdateKind.META_GRADIENT
LAYOUT = FlatLayout.of({"w": torch.zeros(2)})


def policies(**settings) -> tuple[Policy, BufferPolicy]:  # type: ignore[no-untyped-def]
    values = {"run_dir": "unused", "rounds": 10, "clients_per_round": 3, "min_clients": 1, "schedule": "buffered",
              "buffer_size": 2, "max_staleness": 3} | settings
    c = build(values)
    return (Policy(c.run, c.rounds, c.clients_per_round, c.min_clients, c.round_deadline_s),
            BufferPolicy.of(c.run, c.clients_per_round))


def fresh() -> Buffer:
    return Buffer(WeightedMean(LAYOUT))


def live(*ids: str) -> Clients:
    return Clients(sorted(ids), {}, {})


def give(bp: BufferPolicy, s: BufferedState, cid: str, step: int, version: str = "v0") -> Assigned:
    a = plan_assignment(bp, s, cid, step=step, version=version, now=0.0)
    assert a is not None
    apply_assignment(s, a)
    return a


def test_the_staleness_weight_is_one_plus_tau_to_the_minus_a() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(1, 0.5) == pytest.approx(2 ** -0.5)
    assert staleness_weight(3, 1.0) == pytest.approx(0.25)
    assert staleness_weight(8, 0.0) == 1.0  # a = 0: no discount (FedBuff's plain mean)
    with pytest.raises(ValueError, match="tau >= 0"):
        staleness_weight(-1, 0.5)


def test_assignments_up_to_the_bound_a_repeated_poll_gets_the_same_one() -> None:
    _, bp = policies()
    s = BufferedState(fresh())
    a = give(bp, s, "a", 0)
    assert plan_assignment(bp, s, "a", step=0, version="v0", now=1.0) == a  # same version: the same assignment
    give(bp, s, "b", 0)
    give(bp, s, "c", 0)
    assert plan_assignment(bp, s, "d", step=0, version="v0", now=1.0) is None  # 3 = --clients-per-round
    # A client asking again after a step gave its old assignment up: a new number on the new version.
    again = plan_assignment(bp, s, "a", step=1, version="v1", now=2.0)
    assert again is not None and again.number == 4 and again.step == 1
    assert len({x.number for x in s.assigned.values()} | {again.number}) == 4


def test_an_update_must_name_its_assignment_and_base_version() -> None:
    _, bp = policies()
    s = BufferedState(fresh())
    a = give(bp, s, "a", 0)

    def check(**kw):  # type: ignore[no-untyped-def]
        args = {"number": a.number, "client_id": "a", "base_version": "v0", "kind": GRAD, "expected_kind": GRAD,
                "validation": False} | kw
        return check_update(bp, s, **args)

    assert check() == a
    for kw, code, reason in (({"number": a.number + 1}, grpc.StatusCode.FAILED_PRECONDITION, Reason.ROUND_CLOSED),
                             ({"client_id": "b"}, grpc.StatusCode.FAILED_PRECONDITION, Reason.ROUND_CLOSED),
                             ({"base_version": "v-older"}, grpc.StatusCode.FAILED_PRECONDITION, Reason.STALE_VERSION),
                             ({"kind": None}, grpc.StatusCode.INVALID_ARGUMENT, Reason.WRONG_KIND),
                             ({"validation": True}, grpc.StatusCode.INVALID_ARGUMENT, Reason.WRONG_KIND)):
        with pytest.raises(Rejected) as info:
            check(**kw)
        assert (info.value.code, info.value.reason) == (code, reason), kw


def test_tau_is_counted_by_the_coordinator_and_bounded_by_max_staleness() -> None:
    _, bp = policies(max_staleness=3)
    s = BufferedState(fresh())
    a = give(bp, s, "a", 5)
    assert check_staleness(bp, a, step=5) == 0
    assert check_staleness(bp, a, step=8) == 3
    with pytest.raises(Rejected) as info:
        check_staleness(bp, a, step=9)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.reason == Reason.STALE_VERSION


def test_k_accepted_updates_make_a_ready_buffer_counted_once() -> None:
    p, bp = policies(buffer_size=2)
    s, state = BufferedState(fresh()), RoundsState()
    a, b = give(bp, s, "a", 0), give(bp, s, "b", 0)
    accept(bp, s, a, {"w": torch.ones(2)}, weight=1.0, tau=0, s=1.0, norm=1.0, metrics={"loss_post": 2.0},
           fresh=fresh)
    assert decide(p, bp, state, s, live("a", "b"), 0.0) == Wait() and s.buffer.count == 1
    assert is_duplicate(s, a.number, "a") and not is_duplicate(s, a.number, "b") and "a" not in s.assigned
    accept(bp, s, b, {"w": torch.ones(2)}, weight=1.0, tau=1, s=0.5, norm=1.0, metrics={"loss_post": 4.0},
           fresh=fresh)
    assert decide(p, bp, state, s, live("a", "b"), 0.0) == Step()
    assert len(s.ready) == 1 and s.buffer.count == 0  # exactly K in a buffer; the next fills a fresh one
    assert s.ready[0].metrics() == {"loss_post": 3.0}
    assert buffered.staleness_summary(s.ready[0]) == {"staleness_mean": 0.5, "staleness_max": 1,
                                                      "staleness_weight_mean": 0.75}


def test_a_stale_assignment_holds_no_slot_an_orphaned_one_is_dropped_and_the_last_step_drops_all() -> None:
    p, bp = policies(max_staleness=3, rounds=10, clients_per_round=2)
    s = BufferedState(fresh())
    give(bp, s, "a", 0)
    give(bp, s, "b", 3)
    assert plan_assignment(bp, s, "c", step=3, version="v3", now=0.0) is None  # 2 slots, both held
    assert plan_assignment(bp, s, "c", step=4, version="v4", now=0.0) is not None  # a's is 4 > 3 behind
    assert "a" in s.assigned  # kept: its update is answered STALE_VERSION, not "unknown"
    state = RoundsState(next_round=4)
    assert decide(p, bp, state, s, live("a", "b"), 0.0) == Wait()
    del s.assigned["a"]
    assert decide(p, bp, state, s, live("a"), 0.0) == Drop(frozenset({"b"}), "their lease expired")
    give(bp, s, "c", 4)
    final = RoundsState(next_round=10)
    decision = decide(p, bp, final, s, live("b", "c"), 0.0)
    assert isinstance(decision, Drop) and decision.clients == {"b", "c"}
    s.assigned.clear()
    opened = decide(p, bp, final, s, live("a", "b", "c"), 0.0)
    assert isinstance(opened, Open) and opened.evaluation and not opened.validation  # the final evaluation


def test_a_validation_opens_between_steps_and_keeps_outstanding_assignments() -> None:
    p, bp = policies(eval_every=2)
    s = BufferedState(fresh())
    give(bp, s, "a", 1)
    opened = decide(p, bp, RoundsState(next_round=2), s, live("a", "b", "c"), 0.0)
    assert isinstance(opened, Open) and opened.validation and opened.index == 2
    assert "a" in s.assigned
    assert decide(p, bp, RoundsState(next_round=2, validated_through=2), s, live("a", "b", "c"), 0.0) == Wait()


# ---- the weighting as the coordinator applies it -----------------------------------------------------


def coordinator(tmp_path: Path, **settings) -> Coordinator:  # type: ignore[no-untyped-def]
    values = {"run_dir": str(tmp_path / "run"), "rounds": 5, "clients_per_round": 3, "schedule": "buffered",
              "buffer_size": 2, "staleness_exponent": 1.0, "max_staleness": 4, "outer_lr": 0.5,
              "norm_clip_factor": 0.0} | settings
    c = Coordinator(build(values))
    for cid in ("a", "b", "c"):
        c.join(cid, device="cpu", num_tasks=0)
    return c


def submit(c: Coordinator, cid: str, number: int, version: str, value: float, weight: float = 10.0) -> bool:
    """admit then commit, as the service does; returns whether it was a duplicate."""
    tensors = {k: torch.full_like(v, value) for k, v in c.parameters().items()}
    meta = UpdateMeta(c.run.run_id, number, cid, version, GRAD, weight, {"loss_post": 1.0}, encode(tensors).header)
    return c.commit(c.admit(meta), tensors)


def test_the_step_is_sum_w_s_u_over_sum_w_with_tau_from_the_assignment_table(tmp_path: Path) -> None:
    c = coordinator(tmp_path)
    assert c.buffered is not None
    a0 = c._assignment_for("a")
    b0 = c._assignment_for("b")
    assert a0.action == b0.action == Action.TRAIN and a0.round != b0.round
    assert not submit(c, "b", b0.round, b0.version, 1.0)
    c0 = c._assignment_for("c")
    assert not submit(c, "c", c0.round, c0.version, 1.0)  # K = 2: the first buffer is full, both τ = 0
    thread = RoundThread(c)
    c.buffered.step(thread)
    assert c.next_round == 1
    assert c.buffered.state.assigned["a"].step == 0  # a, still computing, holds its assignment of version 0
    # a answers version 0 one step late (τ = 1, s = 1/2), b a fresh assignment (τ = 0, s = 1).
    b1 = c._assignment_for("b")
    assert not submit(c, "a", a0.round, a0.version, 4.0, weight=10.0)
    assert submit(c, "a", a0.round, a0.version, 4.0)  # a resend: a duplicate, not counted twice
    assert not submit(c, "b", b1.round, b1.version, 2.0, weight=5.0)
    buf = c.buffered.state.ready[0]
    assert buf.staleness == [1, 0] and buf.weights == [0.5, 1.0] and buf.count == 2
    expected = (10.0 * 0.5 * 4.0 + 5.0 * 1.0 * 2.0) / (10.0 + 5.0)  # Σ w s u / Σ w
    assert torch.allclose(buf.accumulator.mean(), torch.full((c.layout.numel,), expected))


def test_an_update_beyond_max_staleness_is_refused_and_theta_is_unchanged(tmp_path: Path) -> None:
    c = coordinator(tmp_path, max_staleness=0, buffer_size=1)
    assert c.buffered is not None
    old = c._assignment_for("a")
    fresh_b = c._assignment_for("b")
    assert not submit(c, "b", fresh_b.round, fresh_b.version, 1.0)
    c.buffered.step(RoundThread(c))
    theta = c.broadcast.theta.clone()
    with pytest.raises(Rejected) as info:
        submit(c, "a", old.round, old.version, 1.0)
    assert info.value.reason == Reason.STALE_VERSION and "over --max-staleness 0" in info.value.message
    assert torch.equal(c.broadcast.theta, theta) and c.buffered.state.buffer.count == 0
    assert "a" not in c.buffered.state.assigned and c.buffered.state.refused_stale == 1
    again = c._assignment_for("a")  # the client asks for new work: the current version
    assert again.action == Action.TRAIN and again.version == c.version != old.version


def test_no_update_counts_beyond_the_last_outer_step(tmp_path: Path) -> None:
    c = coordinator(tmp_path, rounds=1, buffer_size=1)
    assert c.buffered is not None
    a, b = c._assignment_for("a"), c._assignment_for("b")
    assert not submit(c, "b", b.round, b.version, 1.0)  # fills the buffer of the one and last step
    with pytest.raises(Rejected) as info:
        submit(c, "a", a.round, a.version, 1.0)
    assert info.value.reason == Reason.ROUND_CLOSED and "(--rounds)" in info.value.message
    assert c._assignment_for("c").action == Action.WAIT and len(c.buffered.state.ready) == 1
