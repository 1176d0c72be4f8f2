"""Bounds on what one peer can hold: stream idle time and length, streams at once, Join rate.

The coordinator serves on grpc.aio (server/grpc_server.py): a waiting call is a coroutine,
not a thread, so what a peer holds is memory and a slot, and each has a bound:

- StreamTimer: every wait of a stream on its peer (for the next request message, or for the
  peer's flow-control window to take a response) ends after --stream-idle-s, and the stream
  ends after max_s in all (120 s: twice the deadline fedmeta's client gives a stream, so a
  peer trickling one byte per idle period still ends). The service then ends the call with
  CANCELLED, and its `finally` frees the slots. No thread watches: each wait is an
  asyncio.wait_for.
- Gate: at most `limit` holders of one kind at once (open update and parameter streams:
  --max-streams), so idle streams cannot grow the coordinator's memory without bound.
- KeyedGate: one holder per key (one upload per client id).
- JoinRateLimiter: a token bucket per peer address: rate r per second, burst 10 r.

A waiting long-poll needs no gate of its own: one per client id is held (a second is
answered at once) and the registry holds at most --max-clients ids.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc

T = TypeVar("T")
_HAS_TIMEOUT = sys.version_info >= (3, 11)


class StreamIdle(Exception):
    """A stream waited on its peer for longer than --stream-idle-s, or lasted longer than max_s."""


class StreamTimer:
    """One stream's bounds: idle_s for each wait on the peer, max_s for the whole stream."""

    def __init__(self, idle_s: float, *, max_s: float = 120.0) -> None:
        self.idle_s = idle_s
        self.ends_by = time.monotonic() + max_s

    async def bounded(self, waiting: Awaitable[T]) -> T:
        """await `waiting` (a read from or a write to the peer) for at most the time left."""
        left = max(0.0, min(self.idle_s, self.ends_by - time.monotonic()))
        try:
            if _HAS_TIMEOUT:  # no task per wait, unlike wait_for (3 per update, 3,000 a round at scale)
                async with asyncio.timeout(left):  # type: ignore[attr-defined]
                    return await waiting
            return await asyncio.wait_for(waiting, timeout=left)
        except TimeoutError:
            raise StreamIdle(f"no progress from the peer for {self.idle_s:g} s (--stream-idle-s), or the stream "
                             "outlasted its limit") from None


class Gate:
    """At most `limit` holders at once; try_enter never blocks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.held = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.held -= 1


class KeyedGate:
    """At most one holder per key (e.g. one upload per client id); try_enter never blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def try_enter(self, key: str) -> bool:
        with self._lock:
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            self._held.discard(key)


def peer_address(context: grpc.ServicerContext) -> str:
    """The peer's address without its port: 'ipv4:10.0.0.5:51234' -> 'ipv4:10.0.0.5'."""
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class JoinRateLimiter:
    """Token bucket per key: tokens refill at rate_per_s up to a burst of 10 s worth (at least 1).

    Buckets that have refilled to the burst carry no state and are dropped, so the table
    holds at most the keys seen in the last burst / rate seconds (plus max_keys as a cap).
    """

    def __init__(self, rate_per_s: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = max(1.0, math.ceil(10 * rate_per_s))
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return True

    def _prune(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.max_keys:  # every bucket busy: forget the oldest ones
            del self._buckets[min(self._buckets, key=lambda k: self._buckets[k][1])]
