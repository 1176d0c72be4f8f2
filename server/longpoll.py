"""The long-poll: what a waiting client is told, and the coroutine that waits until it changes.

Coordinator.wait runs on the service's event loop (server/service.py). It parks an event
under the client's id (server/changes.py) and holds no thread while it waits; a new round
wakes only the clients it samples. A caller that hangs up cancels the coroutine: the client
stops counting as polling at once, and as live HANGUP_GRACE_S later unless it calls again
(server/registry.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
import threading
from typing import Any, Protocol

import grpc

from fedmeta.common.refusal import Reason
from fedmeta.server.changes import Changes
from fedmeta.server.errors import Rejected
from fedmeta.server.registry import Registry
from fedmeta.server.rounds import RoundsState


class Coordinator(Protocol):
    """What the long-poll uses of server/coordinator.py's Coordinator."""

    _cond: Changes
    registry: Registry
    state: RoundsState
    buffered: Any
    finished: threading.Event

    def clock(self) -> float: ...

    def _check_available(self) -> None: ...

# A waiting long-poll re-reads its assignment at least this often. Every change of an assignment
# notifies (server/changes.py), so this is a safety net: 10,000 parked polls re-checking every
# 5 s cost the coordinator about a second of CPU per 5 s.
POLL_RECHECK_S = 30.0


class Action(Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    WAIT = "wait"
    FINISHED = "finished"


@dataclass(frozen=True)
class Assignment:
    action: Action
    round: int = 0
    version: str = ""
    detail: str = ""
    validation: bool = False  # an EVALUATE on validation tasks, during training


async def wait(c: Coordinator, client_id: str, timeout_s: float) -> Assignment:
    """Long-poll: until this client has work, the run finishes, or timeout_s passes.

    A coroutine on the service's event loop: it parks an event under the client's id
    (server/changes.py) and holds no thread while it waits. A caller that hangs up
    cancels it, and it stops counting as polling at once.
    """
    deadline = c.clock() + timeout_s
    with c._cond:
        info = c.registry.known(client_id)
        if info.polling > 0:
            deadline = 0.0  # one long-poll per client id: a second one is answered at once
        info.polling += 1
        info.hung_up_at = None
    event: asyncio.Event | None = None
    hung_up = False
    try:
        while True:
            with c._cond:
                if event is not None:
                    c._cond.unpark(client_id, event)
                    if info.left:
                        c.registry.check_not_revoked(client_id)
                        raise Rejected(grpc.StatusCode.NOT_FOUND, f"client {client_id!r} left the run",
                                       Reason.NOT_JOINED)
                c._check_available()
                info.last_seen = c.clock()
                assignment = assignment_for(c, client_id)
                remaining = deadline - c.clock()
                if assignment.action != Action.WAIT or remaining <= 0:
                    if assignment.action == Action.FINISHED:
                        info.told_finished = True
                    return assignment
                event = c._cond.park(client_id)
            # woken by notify_all, or by this timer (a timer, not wait_for: no task per wait)
            timer = asyncio.get_running_loop().call_later(min(remaining, POLL_RECHECK_S), event.set)
            try:
                await event.wait()
            except asyncio.CancelledError:  # the caller hung up (gRPC cancels its call's coroutine)
                hung_up = True
                raise
            finally:
                timer.cancel()
    finally:
        with c._cond:
            if event is not None:
                c._cond.unpark(client_id, event)
            info.polling -= 1
            info.last_seen = c.clock()
            if hung_up:
                info.hung_up_at = info.last_seen


def assignment_for(c: Coordinator, client_id: str) -> Assignment:
    """What the client is told now (under the coordinator's lock)."""
    if c.finished.is_set():
        return Assignment(Action.FINISHED, detail="the run is finished")
    rnd = c.state.round
    if rnd is None and c.buffered is not None:
        return _buffered_assignment(c, client_id)
    if rnd is None:
        return Assignment(Action.WAIT, detail="waiting for clients to start the next round")
    if client_id in rnd.sampled and client_id not in rnd.answered:
        action = Action.EVALUATE if rnd.evaluation else Action.TRAIN
        return Assignment(action, rnd.index, rnd.version, validation=rnd.validation)
    return Assignment(Action.WAIT, detail=f"round {rnd.index} is in progress without you")


def _buffered_assignment(c: Coordinator, client_id: str) -> Assignment:
    """--schedule buffered: TRAIN at once on the current θ while a slot is free (server/buffered.py)."""
    assert c.buffered is not None
    a = c.buffered.assignment(client_id)
    if a is None:
        return Assignment(Action.WAIT, detail=f"the {c.buffered.policy.max_assignments} training slots are "
                          "taken, or an outer step or an evaluation is under way")
    return Assignment(Action.TRAIN, a.number, a.version)

