"""The client registry (server/registry.py): leases, leave and rejoin, the cap, purging, benching."""

from __future__ import annotations

import grpc
import pytest

from fedmeta.common.refusal import Reason
from fedmeta.server.errors import Rejected
from fedmeta.server.registry import HANGUP_GRACE_S, Registry


def rejected(call) -> Rejected:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as info:
        call()
    return info.value


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


def test_a_client_that_hung_up_on_its_long_poll_is_live_only_for_the_grace_unless_it_calls() -> None:
    r = registry(lease_s=245.0)  # --poll-timeout-s 120
    r.join("a", device="cpu", num_tasks=0, now=0.0)
    r.join("b", device="cpu", num_tasks=0, now=0.0)
    for cid in "ab":
        r.clients[cid].last_seen = r.clients[cid].hung_up_at = 1.0  # as server/longpoll.py records a hang-up
    assert r.live(1.0 + HANGUP_GRACE_S) == ["a", "b"]
    assert r.live(1.5 + HANGUP_GRACE_S) == [], "a client that hung up was live for its whole lease"
    r.touch("b", 20.0)  # it came back: a lease again
    assert r.live(200.0) == ["b"] and r.clients["b"].hung_up_at is None
    r.clients["a"].polling = 1  # polling again counts as live whatever came before
    assert r.live(200.0) == ["a", "b"]
    r.clients["a"].polling = 0
    r.join("a", device="cpu", num_tasks=0, now=210.0)  # a rejoin is a call too
    assert r.live(250.0) == ["a", "b"]


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
