"""Bounds on what one peer can hold: stream idle time, threads per kind of call, Join rate.

The sync gRPC server gives a handler a blocking request iterator and a thread for the
whole call, so a peer that opens a stream and then sends nothing holds that thread (and
maybe an upload slot) until the call's deadline, which the peer chooses. Three bounds
keep the coordinator answering:

- StreamWatchdog: one thread for every stream of the process. A stream registers a
  Watch; while the handler waits on the peer (for the next request message, or for the
  peer to take a response) the watch records since when. Once that wait passes
  --stream-idle-s, or the stream has lasted max_s (120 s: twice the deadline fedmeta's
  client gives a stream, so a peer trickling one byte per idle period still ends), the
  watchdog calls context.cancel(), which ends the blocked read with an error in the
  handler, whose `finally` frees the slot. Cost: one thread in all and a
  scan of the open streams every idle_s / 4, instead of a reader thread per stream.
- Gate: at most `limit` handlers of one kind at once (long-polls, streams), so waiting
  calls can never take the threads Join, Heartbeat and SubmitUpdate need.
- JoinRateLimiter: a token bucket per peer address: rate r per second, burst 10 r.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

T = TypeVar("T")


class Watch:
    """One stream's wait on its peer: since when (monotonic seconds), or None while not waiting."""

    __slots__ = ("context", "waiting_since", "cancelled", "ends_by")

    def __init__(self, context: grpc.ServicerContext, ends_by: float) -> None:
        self.context = context
        self.waiting_since: float | None = None
        self.cancelled = False
        self.ends_by = ends_by


class StreamWatchdog:
    """Cancels streams that wait on their peer for longer than idle_s."""

    def __init__(self, idle_s: float, *, max_s: float = 120.0) -> None:
        self.idle_s = idle_s
        self.max_s = max_s  # a stream that trickles a message just often enough still ends by then
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def watch(self, context: grpc.ServicerContext) -> Iterator[Watch]:
        w = Watch(context, time.monotonic() + self.max_s)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedmeta-stream-watchdog", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                self._watches.discard(w)

    def requests(self, w: Watch, iterator: Iterator[T]) -> Iterator[T]:
        """The request messages, with the time spent waiting for each one watched."""
        while True:
            w.waiting_since = time.monotonic()
            try:
                message = next(iterator)
            except StopIteration:
                return
            finally:
                w.waiting_since = None
            yield message

    def responses(self, w: Watch, iterator: Iterator[T]) -> Iterator[T]:
        """The response messages, with the time the peer takes to accept each one watched.

        gRPC resumes this generator only after the previous message was handed to the
        transport, which waits for the peer's flow-control window: a peer that reads
        nothing leaves the generator suspended, with waiting_since set."""
        for message in iterator:
            w.waiting_since = time.monotonic()
            yield message
            w.waiting_since = None

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                stale = [w for w in self._watches if not w.cancelled and (
                    now > w.ends_by or (w.waiting_since is not None and now - w.waiting_since > self.idle_s))]
            for w in stale:
                w.cancelled = True
                w.context.cancel()

    def stop(self) -> None:
        self._stop.set()


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
