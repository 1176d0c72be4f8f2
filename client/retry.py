"""Retries for transient gRPC failures: exponential backoff with full jitter.

UNAVAILABLE and DEADLINE_EXCEEDED are retried; so is CANCELLED, which a client sees when the
coordinator cancelled its call (an orderly shutdown past its grace period, or the stream
watchdog) — a call this client cancelled itself stops with its stop event; and so is
RESOURCE_EXHAUSTED where it means an overloaded coordinator (its RPC cap, the Join rate limit,
a full registry), with a pause of at least a second. Every other status is an answer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger("fedmeta.client")
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# What grpc's server answers past maximum_concurrent_rpcs (--max-concurrent-rpcs).
RPC_LIMIT_DETAILS = "Concurrent RPC limit exceeded!"
OVERLOAD_MIN_DELAY_S = 1.0


def retryable(exc: grpc.RpcError, *, overload: bool = True) -> bool:
    """Whether exc is transient; overload=False retries RESOURCE_EXHAUSTED only for the RPC cap."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code in RETRYABLE:
        return True
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return overload or (isinstance(exc, grpc.Call) and exc.details() == RPC_LIMIT_DETAILS)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """delay_n = U(0, min(max_delay_s, initial_delay_s * 2**n)); give up after give_up_s."""

    initial_delay_s: float = 0.1
    max_delay_s: float = 5.0
    give_up_s: float = 300.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_delay_s, self.initial_delay_s * 2**attempt))


class CoordinatorUnreachable(RuntimeError):
    """The coordinator stayed unreachable for longer than the retry policy allows."""


def with_retry(
    call: Callable[[], T], *, what: str, policy: RetryPolicy, stop: threading.Event, rng: random.Random,
    overload: bool = True,
) -> T:
    """Run call(), retrying transient failures until it answers or policy.give_up_s passes."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if not retryable(exc, overload=overload) or stop.is_set():
                raise
            elapsed = time.monotonic() - start
            if elapsed > policy.give_up_s:
                raise CoordinatorUnreachable(
                    f"{what}: the coordinator has been unreachable for {elapsed:.0f} s ({code.name if code else '?'})"
                ) from exc
            delay = policy.delay(attempt, rng)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                delay = max(delay, OVERLOAD_MIN_DELAY_S * rng.uniform(1.0, 2.0))
            if attempt == 0 or attempt % 10 == 0:
                log.warning("%s: %s (%s); retrying", what, code.name if code else "?", exc.details() if isinstance(exc, grpc.Call) else exc)
            attempt += 1
            if stop.wait(delay):
                raise
