"""The coordinator's parts without a server: registry, broadcast, admission, run state, refusals."""

from __future__ import annotations

import math
import re
from pathlib import Path

import grpc
import pytest
import torch

from common.aggregation import FlatLayout, NormFilter, WeightedMean
from common.algorithms import UpdateKind
from common.algorithms.outer import MAX_UPDATE_ABS
from common.codec import TensorSetError, TensorSetTooLarge, encode
from common.proto import pb
from common.refusal import REASON_KEY, Reason, reason_from_metadata, reason_metadata
from server.admission import Admission, Ticket, UpdateMeta, check_header, check_values
from server.broadcast import Broadcast, version_of
from server.config import build
from server.errors import MAX_MESSAGE_CHARS, Rejected, refusal_of, refusals
from server.registry import Registry
from server.rounds import Round
from server.runstate import RESUME_KEYS, check_resumable

PROTO = Path(__file__).resolve().parents[2] / "protos" / "fedmeta" / "v1" / "coordinator.proto"


def rejected(call) -> Rejected:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as info:
        call()
    return info.value


# ---- refusals ------------------------------------------------------------------------------------------
def test_the_reason_enum_is_the_proto_contract() -> None:
    names = {v.name.removeprefix("REFUSAL_REASON_") for v in pb.RefusalReason.DESCRIPTOR.values} - {"UNSPECIFIED"}
    assert names == {r.value for r in Reason} == {r.name for r in Reason}
    assert "fedmeta-reason" in PROTO.read_text()
    assert reason_from_metadata(reason_metadata(Reason.NOT_JOINED)) == Reason.NOT_JOINED
    assert reason_from_metadata(((REASON_KEY, b"WRONG_RUN"),)) == Reason.WRONG_RUN
    assert reason_from_metadata((("other", "NOT_JOINED"),)) is None and reason_from_metadata(None) is None


class FakeContext:
    """What @refusals uses of a grpc.ServicerContext: trailing metadata, then abort (which raises)."""

    def __init__(self) -> None:
        self.trailing: tuple = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, metadata) -> None:  # type: ignore[no-untyped-def]
        self.trailing = tuple(metadata)

    def abort(self, code, message):  # type: ignore[no-untyped-def]
        self.aborted = (code, message)
        raise RuntimeError("aborted")


@pytest.mark.parametrize("error, code, reason", [
    (Rejected(grpc.StatusCode.NOT_FOUND, "x" * 5000, Reason.NOT_JOINED), grpc.StatusCode.NOT_FOUND, Reason.NOT_JOINED),
    (TensorSetTooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_LARGE),
    (TensorSetError("bad digest"), grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_TENSORS),
])
def test_one_decorator_maps_domain_errors_for_unary_and_streaming_handlers(error, code, reason) -> None:
    class Servicer:
        @refusals
        def unary(self, request, context):  # type: ignore[no-untyped-def]
            raise error

        @refusals
        def stream(self, request, context):  # type: ignore[no-untyped-def]
            yield 1
            raise error

    for call in (lambda c: Servicer().unary(None, c), lambda c: list(Servicer().stream(None, c))):
        context = FakeContext()
        with pytest.raises(RuntimeError, match="aborted"):
            call(context)
        assert context.aborted is not None and context.aborted[0] == code
        assert len(context.aborted[1]) <= MAX_MESSAGE_CHARS + 40  # clipped, with a note of how much
        assert reason_from_metadata(context.trailing) == reason
    assert refusal_of(ValueError("not ours")) is None


# ---- registry -------------------------------------------------------------------------------------------
def registry(**kw) -> Registry:  # type: ignore[no-untyped-def]
    return Registry(**({"run_id": "r", "max_clients": 3, "forget_client_s": 100.0, "max_silent_rounds": 2,
                        "lease_s": 10.0} | kw))


def test_registry_leases_leave_and_rejoin_keep_the_record() -> None:
    r = registry()
    r.join("a", device="cpu", num_tasks=0, now=0.0)
    assert r.live(5.0) == ["a"] and r.live(10.5) == []
    r.touch("a", 10.0)
    assert r.live(15.0) == ["a"]
    r.clients["a"].answered = 4
    r.leave("a")
    assert r.live(15.0) == [] and rejected(lambda: r.known("a")).reason == Reason.NOT_JOINED
    r.join("a", device="cpu", num_tasks=0, now=16.0)
    assert r.clients["a"].answered == 4 and r.seen == 1


def test_registry_cap_forgets_who_left_first_then_refuses() -> None:
    r = registry()
    for cid in "abc":
        r.join(cid, device="", num_tasks=0, now=0.0)
    r.leave("a")
    r.join("d", device="", num_tasks=0, now=1.0)  # "a" left: forgotten to make room
    assert set(r.clients) == {"b", "c", "d"}
    err = rejected(lambda: r.join("e", device="", num_tasks=0, now=1.0))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == Reason.REGISTRY_FULL


def test_registry_purge_spares_the_busy_and_polling() -> None:
    r = registry(forget_client_s=5.0)
    for cid in "abc":
        r.join(cid, device="", num_tasks=0, now=0.0)
    r.clients["b"].polling = 1
    assert r.purge(6.0, busy={"c"}) == ["a"] and set(r.clients) == {"b", "c"}


def test_silent_rounds_bench_a_client_for_doubling_spans() -> None:
    r = registry(max_silent_rounds=2)
    r.join("s", device="", num_tasks=0, now=0.0)
    assert r.tally(0, (), {"s"}) == [] and r.tally(1, (), {"s"}) == ["s"]
    assert r.clients["s"].benched_until == 1 + 1 + 2
    r.tally(4, (), {"s"}), r.tally(5, (), {"s"})
    assert r.clients["s"].benched_until == 5 + 1 + 4 and r.clients["s"].benchings == 2
    r.tally(6, {"s"}, ())
    assert r.clients["s"].answered == 1 and r.clients["s"].silent == 0
    fresh = registry()
    fresh.restore(r.records(), r.seen, now=0.0)
    assert fresh.clients["s"].record() == r.clients["s"].record()


# ---- broadcast ------------------------------------------------------------------------------------------
def test_broadcast_versions_readers_and_the_in_place_step() -> None:
    layout = FlatLayout.of({"w": torch.zeros(3), "b": torch.zeros(1)})
    theta = torch.arange(4, dtype=torch.float32)
    b = Broadcast(layout, theta, encoding="float16", chunk_bytes=1 << 20)
    assert b.version == version_of(layout, theta) == encode(layout.views(theta)).header.sha256.hex()
    assert set(b.encoded) == {"float32", "float16"}
    assert b.inline(b.version) is not None and b.inline("old") is None
    assert rejected(lambda: b.acquire("old")).reason == Reason.STALE_VERSION
    b.acquire(b.version)
    assert b.begin_step() is False  # a reader: step a copy
    assert rejected(lambda: b.acquire(b.version)).reason == Reason.STALE_VERSION  # none start while stepping
    assert b.inline(b.version) is None
    b.release()
    b.publish(theta + 1)
    assert b.version != version_of(layout, theta) and not b.stepping and b.begin_step() is True


# ---- admission ------------------------------------------------------------------------------------------
RUN = build({"run_dir": "unused", "tasks_per_client": 4}).run
LAYOUT = FlatLayout.of({"w": torch.zeros(2, 2), "b": torch.zeros(2)})


def meta(**kw) -> UpdateMeta:  # type: ignore[no-untyped-def]
    tensors = encode(LAYOUT.views(torch.zeros(LAYOUT.numel))).header
    values = {"run_id": RUN.run_id, "round": 0, "client_id": "a", "base_version": "v", "kind": UpdateKind.META_GRADIENT,
              "weight": 2.0, "metrics": {"loss_pre": 1.0, "loss_post": 0.5}, "tensors": tensors} | kw
    return UpdateMeta(**values)


def admission(norm_refusal: float | None = None) -> Admission:
    return Admission(RUN, LAYOUT.specs, UpdateKind.META_GRADIENT, max_update_bytes=1 << 20,
                     max_update_norm=norm_refusal, norm_filter=NormFilter(factor=0, window=4, warmup=1))


def open_round() -> Round:
    return Round(0, False, {"a", "b"}, 0.0, 10.0, "v", WeightedMean(LAYOUT))


@pytest.mark.parametrize("change, reason", [
    ({"round": 1}, Reason.ROUND_CLOSED),
    ({"client_id": "z"}, Reason.NOT_SAMPLED),
    ({"base_version": "old"}, Reason.STALE_VERSION),
    ({"validation": True}, Reason.ROUND_CLOSED),
    ({"kind": UpdateKind.PARAMETER_DELTA}, Reason.WRONG_KIND),
])
def test_admit_refuses_answers_to_another_round(change, reason) -> None:
    assert rejected(lambda: admission().admit(meta(**change), open_round())).reason == reason


@pytest.mark.parametrize("change, reason", [
    ({"weight": 5.0}, Reason.BAD_WEIGHT),
    ({"weight": 0.0}, Reason.BAD_WEIGHT),
    ({"weight": math.nan}, Reason.BAD_WEIGHT),
    ({"metrics": {"loss_pre": 1.0, "loss_post": 0.5, "made_up": 1.0}}, Reason.BAD_METRICS),
    ({"tensors": None}, Reason.BAD_TENSORS),
    ({"tensors": encode({"w": torch.zeros(2, 2)}).header}, Reason.BAD_TENSORS),
])
def test_the_header_checks_name_their_reason(change, reason) -> None:
    assert rejected(lambda: check_header(RUN, meta(**change), LAYOUT.specs, 1 << 20)).reason == reason
    too_big = rejected(lambda: check_header(RUN, meta(), LAYOUT.specs, 8))
    assert too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_big.reason == Reason.TOO_LARGE


def test_values_are_bounded_before_counting() -> None:
    assert rejected(lambda: check_values({"w": torch.full((2,), MAX_UPDATE_ABS * 2)}, None)).reason == Reason.BAD_VALUES
    assert rejected(lambda: check_values({"w": torch.full((4,), 1.0)}, 1.5)).reason == Reason.BAD_VALUES
    assert check_values({"w": torch.full((4,), 1.0)}, None) == pytest.approx(2.0)


def test_commit_counts_once_with_the_admitted_weight() -> None:
    a, rnd = admission(), open_round()
    ticket = a.weigh(a.admit(meta(), rnd))
    assert ticket == Ticket(meta(), 2.0)
    tensors = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    counted, duplicate = a.count(ticket, rnd, tensors, norm=math.sqrt(6))
    assert counted is rnd and not duplicate
    assert rnd.answered == {"a"} and rnd.metric_weight == 2.0 and rnd.accumulator.count == 1
    assert a.count(ticket, rnd, tensors, norm=1.0) == (None, True)
    assert a.admit(meta(), rnd).duplicate and rnd.accumulator.count == 1
    a.forget_before(9)
    assert not a.counted(meta())


# ---- run state --------------------------------------------------------------------------------------------
def test_resuming_needs_the_same_settings() -> None:
    current = {k: 1 for k in RESUME_KEYS}
    check_resumable(dict(current), current, "runs/x")
    with pytest.raises(ValueError, match=re.escape("inner_lr: checkpoint 2, now 1")):
        check_resumable(current | {"inner_lr": 2}, current, "runs/x")
    old = {k: v for k, v in current.items() if k not in ("eval_every", "eval_ways")}  # before --eval-every
    check_resumable(old, current | {"eval_every": 0}, "runs/x")
