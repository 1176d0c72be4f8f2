"""Per-peer bounds without sockets: the Join token bucket, gates, the allow-list file, retry rules."""

from __future__ import annotations

import asyncio

import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from fedmeta.client import worker
from fedmeta.client.retry import RPC_LIMIT_DETAILS, RetryPolicy, retryable, with_retry
from fedmeta.server import grpc_server as service
from fedmeta.server.config import build, read_allowed_clients
from fedmeta.server.limits import Gate, JoinRateLimiter, KeyedGate, StreamIdle, StreamTimer


def test_join_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = JoinRateLimiter(0.5)  # burst: 10 s worth = 5 joins
    assert [bucket.allow("ipv4:10.0.0.1") for _ in range(6)] == [True] * 5 + [False]
    assert bucket.allow("ipv4:10.0.0.2")  # another peer has its own bucket


def test_join_bucket_table_stays_bounded() -> None:
    bucket = JoinRateLimiter(1000.0, max_keys=50)
    for i in range(500):
        assert bucket.allow(f"ipv4:10.0.{i // 256}.{i % 256}")
    assert len(bucket._buckets) <= 50


def test_gates_never_block_and_count_holders() -> None:
    gate = Gate(2)
    assert gate.try_enter() and gate.try_enter() and not gate.try_enter()
    gate.leave()
    assert gate.try_enter()
    ids = KeyedGate()
    assert ids.try_enter("a") and not ids.try_enter("a") and ids.try_enter("b")
    ids.leave("a")
    assert ids.try_enter("a")


def test_allowed_clients_file(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("# sites\nsite-1\n\n  site-2  # the second one\n")
    assert read_allowed_clients(path) == {"site-1", "site-2"}
    assert build({"run_dir": str(tmp_path / "run"), "allowed_clients": str(path)}).allowed_clients == str(path)
    path.write_text("site-1\nnot an id\n")
    with pytest.raises(ValueError, match=r"^--allowed-clients: .* line 2: "):
        read_allowed_clients(path)
    path.write_text("# nobody\n")
    with pytest.raises(ValueError, match="names no client id"):
        read_allowed_clients(path)


def test_client_keepalive_complies_with_the_coordinator_policy() -> None:
    """An honest client must never be sent GOAWAY (too_many_pings): it pings no more often than
    the coordinator accepts, and never without calls (the coordinator permits none)."""
    client = dict(worker.channel_options())
    server = dict(service.connection_options(build({"run_dir": "runs/unit"})))
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 0
    assert server["grpc.http2.max_ping_strikes"] >= 1
    # an honest long-poll or upload ends within the grace a connection gets when it reaches its age
    assert server["grpc.max_connection_age_grace_ms"] > 1000 * (2 * 10.0 + 10.0)


class _Refusal(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_retry_rules() -> None:
    overloaded = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Join calls")
    cap = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, RPC_LIMIT_DETAILS)
    assert retryable(_Refusal(grpc.StatusCode.UNAVAILABLE, "")) and retryable(overloaded)
    assert not retryable(overloaded, overload=False) and retryable(cap, overload=False)
    assert not retryable(_Refusal(grpc.StatusCode.FAILED_PRECONDITION, ""))
    assert retryable(_Refusal(grpc.StatusCode.CANCELLED, ""))  # the coordinator cancelled the call (shutdown grace, watchdog)
    calls = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) < 2:
            raise overloaded
        return "ok"

    assert with_retry(call, what="Join", policy=RetryPolicy(initial_delay_s=0.0), stop=threading.Event(),
                      rng=random.Random(0)) == "ok"
    assert calls[1] - calls[0] >= 1.0  # overload is retried after a pause of at least a second, not at once


def test_stream_timer_ends_an_idle_wait_and_a_stream_that_trickles_for_too_long() -> None:
    async def scenario() -> None:
        never = asyncio.Event()
        with pytest.raises(StreamIdle):  # a peer that sends nothing
            await StreamTimer(0.2, max_s=10.0).bounded(never.wait())
        trickle = StreamTimer(0.2, max_s=1.0)
        start = time.monotonic()
        with pytest.raises(StreamIdle):  # a message every 0.05 s: never idle, but the stream ends at max_s
            while time.monotonic() - start < 10:
                await trickle.bounded(asyncio.sleep(0.05))
        assert time.monotonic() - start >= 0.9
        busy = StreamTimer(0.2, max_s=10.0)
        for _ in range(3):  # a peer that keeps sending is left alone
            assert await busy.bounded(asyncio.sleep(0.1, result="message")) == "message"

    asyncio.run(scenario())
