"""The coordinator's lock and its wake-ups: threads wait on the condition, long-polls on events.

The round thread waits on a threading.Condition. A waiting WaitForAssignment is a coroutine
on the service's event loop (server/service.py) and costs no thread: it parks an
asyncio.Event here under its client id and awaits it. notify_all(polls=...) wakes the
threads, plus the parked long-polls it names:

    notify_all()                 every long-poll (the run finished or stops, a new θ, pause)
    notify_all(polls=sampled)    only the clients a new round samples
    notify_all(polls=())         none: a Join, an update counted (only the round thread cares)

Waking only the sampled clients keeps a round's cost O(clients per round), not O(connected
clients): with 10,000 parked polls and 1,000 sampled, a round wakes 1,000 coroutines.
Events are set on the loop's thread (call_soon_threadsafe), so notify_all may be called
from any thread that holds the lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection

ALL: None = None


class Changes(threading.Condition):
    """threading.Condition plus per-client asyncio events for the long-polls (guarded by the lock)."""

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parked: dict[str, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the long-polls run on (the gRPC server's)."""
        self._loop = loop

    def park(self, client_id: str) -> asyncio.Event:
        """An event the next notify_all naming this client sets. Call under the lock, on the loop."""
        event = self._parked.get(client_id)
        if event is None:
            event = self._parked[client_id] = asyncio.Event()
        return event

    def unpark(self, client_id: str, event: asyncio.Event) -> None:
        """Forget the client's event (its long-poll ended). Call under the lock."""
        if self._parked.get(client_id) is event:
            del self._parked[client_id]

    @property
    def parked(self) -> int:
        return len(self._parked)

    def notify_all(self, polls: Collection[str] | None = ALL) -> None:  # type: ignore[override]
        super().notify_all()
        if self._loop is None or not self._parked or (polls is not None and not polls):
            return
        if polls is None:
            woken = list(self._parked.values())
            self._parked.clear()
        else:
            woken = [e for e in (self._parked.pop(cid, None) for cid in polls) if e is not None]
        if woken:
            try:
                self._loop.call_soon_threadsafe(_set_all, woken)
            except RuntimeError:  # the loop is closed: the server is gone, nobody awaits these
                pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
