"""The client registry: join, leave, heartbeats and leases, caps, purging, silent-client benching.

Not thread-safe by itself: the Coordinator calls it under its lock. Times are monotonic
seconds passed in (`now`), so every rule here is a function of the registry and the clock.

- A client is live while it long-polls or its last call was at most `lease_s`
  (2 x --poll-timeout-s + 5 s) ago, unless its last long-poll was cut off from its side (its
  process died or its connection broke) over HANGUP_GRACE_S ago with no call since.
- The registry holds at most --max-clients ids; a join past that first forgets clients
  that left, and is refused (REGISTRY_FULL) if none did.
- A client silent for --forget-client-s is forgotten (a forgotten client that comes back
  is told NOT_JOINED and joins again).
- A client sampled and silent in --max-silent-rounds rounds in a row is benched for
  max_silent_rounds * 2**benchings rounds; sampling takes clients that have answered a
  round before ("proven") first (server/rounds.py pick).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from fedmeta.common.logformat import fields
from fedmeta.common.refusal import Reason
from fedmeta.server.errors import Rejected

log = logging.getLogger("fedmeta.coordinator")

# A long-poll that the client's side cut off (its process died and the kernel closed its socket,
# or its connection broke: gRPC cancels the call) keeps the client live only this much longer
# unless it calls again. An honest client that lost its connection re-polls within seconds
# (client/config.py backs off reconnects at most 5 s), and a dead one stops being sampled now,
# not a whole lease (two --poll-timeout-s) later, so a long --poll-timeout-s stays safe.
HANGUP_GRACE_S = 10.0


@dataclass
class ClientInfo:
    client_id: str
    device: str
    num_tasks: int
    last_seen: float
    polling: int = 0
    hung_up_at: float | None = None  # when its last long-poll was cut off from its side; None once it calls
    left: bool = False
    told_finished: bool = False
    answered: int = 0  # rounds this client answered: clients that have answered are sampled first
    silent: int = 0  # rounds in a row it was sampled and did not answer
    benched_until: int = -1  # not sampled before this round (after --max-silent-rounds silent ones)
    benchings: int = 0

    def record(self) -> dict[str, Any]:
        return {"device": self.device, "num_tasks": self.num_tasks, "answered": self.answered,
                "silent": self.silent, "benched_until": self.benched_until, "benchings": self.benchings}

    @classmethod
    def from_record(cls, client_id: str, info: Mapping[str, Any], now: float) -> ClientInfo:
        return cls(client_id, str(info.get("device", ""))[:64], int(info.get("num_tasks", 0)), now,
                   answered=int(info.get("answered", 0)), silent=int(info.get("silent", 0)),
                   benched_until=int(info.get("benched_until", -1)), benchings=int(info.get("benchings", 0)))


class Registry:
    """Who takes part in the run, and since when each was last heard from."""

    def __init__(self, *, run_id: str, max_clients: int, forget_client_s: float, max_silent_rounds: int,
                 lease_s: float) -> None:
        self.run_id = run_id
        self.max_clients = max_clients
        self.forget_client_s = forget_client_s
        self.max_silent_rounds = max_silent_rounds
        self.lease_s = lease_s
        self.clients: dict[str, ClientInfo] = {}
        self.revoked: set[str] = set()  # by the operator (server/steering.py): refused for good
        self.seen = 0  # registrations: distinct ids, unless one was forgotten and came back

    # ---- membership -------------------------------------------------------------------------
    def join(self, client_id: str, *, device: str, num_tasks: int, now: float,
             busy: Callable[[], Iterable[str]] = tuple) -> None:
        """Register (or refresh) a client; `busy()` are ids the open round still needs (never purged),
        asked for only when the registry is full."""
        self.check_not_revoked(client_id)
        info = self.clients.get(client_id)
        if info is None and len(self.clients) >= self.max_clients:
            self.purge(now, busy=busy(), left_too=True)
            if len(self.clients) >= self.max_clients:
                raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the coordinator has {len(self.clients)} registered clients, its limit "
                               "(--max-clients); retry later", Reason.REGISTRY_FULL)
        if info is None or info.left:
            fresh = ClientInfo(client_id, device, num_tasks, now)
            if info is not None:  # rejoining keeps its record: leaving does not wipe silent rounds
                fresh.answered, fresh.silent = info.answered, info.silent
                fresh.benched_until, fresh.benchings = info.benched_until, info.benchings
            else:
                self.seen += 1
            self.clients[client_id] = fresh
            log.info("client %s joined (device %s)", client_id, device or "?",
                     extra=fields(event="client_joined", client=client_id))
        else:
            info.device, info.num_tasks, info.last_seen, info.hung_up_at = device, num_tasks, now, None

    def known(self, client_id: str) -> ClientInfo:
        """The record of a joined client; NOT_JOINED if it never joined, left or was forgotten."""
        self.check_not_revoked(client_id)
        info = self.clients.get(client_id)
        if info is None or info.left:
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"client {client_id!r} has not joined run {self.run_id!r}; call Join first",
                           Reason.NOT_JOINED)
        return info

    def check_not_revoked(self, client_id: str, refused: str = "its calls are") -> None:
        if client_id in self.revoked:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                           f"client {client_id!r} was revoked by the coordinator's operator: {refused} refused and "
                           "it cannot take part in this run again", Reason.NOT_ALLOWED)

    def revoke(self, client_id: str) -> None:
        """Refuse the client from now on; it stops counting as live at once."""
        self.revoked.add(client_id)
        info = self.clients.get(client_id)
        if info is not None:
            info.left = True

    def touch(self, client_id: str, now: float) -> ClientInfo:
        """A call from a joined client renews its lease."""
        info = self.known(client_id)
        info.last_seen, info.hung_up_at = now, None
        return info

    def leave(self, client_id: str) -> ClientInfo:
        info = self.known(client_id)
        info.left = True
        return info

    def purge(self, now: float, *, busy: Iterable[str] = (), left_too: bool = False) -> list[str]:
        """Forget clients silent for --forget-client-s (and, with left_too, every one that left)."""
        keep = set(busy)
        old = [cid for cid, c in self.clients.items()
               if c.polling == 0 and cid not in keep
               and (now - c.last_seen > self.forget_client_s or (left_too and c.left))]
        for cid in old:
            del self.clients[cid]
        if old:
            log.info("forgot %d clients that left or were silent for over %g s (--forget-client-s)",
                     len(old), self.forget_client_s)
        return old

    def is_live(self, info: ClientInfo, now: float) -> bool:
        """Not left, and long-polling now, or heard from within the lease and not hung up on a poll
        over HANGUP_GRACE_S ago."""
        if info.left:
            return False
        if info.polling > 0:
            return True
        if info.hung_up_at is not None and now - info.hung_up_at > HANGUP_GRACE_S:
            return False
        return now - info.last_seen <= self.lease_s

    def live(self, now: float) -> list[str]:
        """Sorted ids of the live clients (is_live)."""
        return sorted(c.client_id for c in self.clients.values() if self.is_live(c, now))

    def answered_counts(self) -> Mapping[str, int]:
        """Per client: rounds answered (the sampling's "proven" test is answered > 0), read through."""
        return _Field(self.clients, "answered")

    def benched_until(self) -> Mapping[str, int]:
        return _Field(self.clients, "benched_until")

    def view(self, now: float) -> RegistryView:
        """The registry as the round policy sees it (rounds.Clients), without copying it."""
        return RegistryView(self, now)

    # ---- after a round ------------------------------------------------------------------------
    def tally(self, round_index: int, answered: Iterable[str], silent: Iterable[str]) -> list[str]:
        """Per client: answered rounds, and silent rounds in a row; --max-silent-rounds of them
        bench a client for max_silent_rounds * 2**benchings rounds. Returns the ids benched."""
        limit = self.max_silent_rounds
        for cid in answered:
            info = self.clients.get(cid)
            if info is not None:
                info.answered += 1
                info.silent = 0
        benched = []
        for cid in silent:
            info = self.clients.get(cid)
            if info is None or info.left:
                continue
            info.silent += 1
            if info.silent >= limit:
                info.benched_until = round_index + 1 + limit * 2 ** min(info.benchings, 16)
                info.benchings += 1
                info.silent = 0
                benched.append(cid)
                log.info("client %s was sampled and silent in %d rounds in a row: not sampled before round %d "
                         "(--max-silent-rounds)", cid, limit, info.benched_until,
                         extra=fields(event="client_benched", round=round_index, client=cid))
        return benched

    # ---- persistence ------------------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint keeps: bounded by --max-clients, the registry, not every id ever seen."""
        return {c.client_id: c.record() for c in self.clients.values() if not c.left}

    def restore(self, records: Mapping[str, Mapping[str, Any]], seen: int, now: float) -> None:
        self.seen = seen
        for cid, info in list(records.items())[: self.max_clients]:
            self.clients[cid] = ClientInfo.from_record(cid, info, now)


class _Field(Mapping[str, int]):
    """One ClientInfo field per client id, read from the registry (no copy: the round thread asks
    for it on every decision, and copying 10,000 records each time held the lock for milliseconds)."""

    def __init__(self, clients: dict[str, ClientInfo], name: str) -> None:
        self._clients = clients
        self._name = name

    def __getitem__(self, client_id: str) -> int:
        return int(getattr(self._clients[client_id], self._name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)


class RegistryView:
    """rounds.Clients over the live registry: `live` (sorted, O(n log n)) is built on first use
    only, which the policy needs to open or resample a round, not to wait for answers."""

    def __init__(self, registry: Registry, now: float) -> None:
        self._registry = registry
        self._now = now
        self.answered = registry.answered_counts()
        self.benched_until = registry.benched_until()

    @functools.cached_property
    def live(self) -> list[str]:
        return self._registry.live(self._now)
