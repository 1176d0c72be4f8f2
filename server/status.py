"""The status snapshot the Admin service and the dashboard serve: GetStatusResponse.

Built in two steps to keep the coordinator's lock short: under it, plain values are copied
(the run's counters, one page of client ids and their registry fields); outside it, the
counters of server/clientstats.py are read and the message is assembled. Bounded: a page
holds at most MAX_PAGE clients; the records are the last clientstats.HISTORY.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from fedmeta.common.proto import admin_pb
from fedmeta.server.clientstats import ClientStats
from fedmeta.server.registry import Registry
from fedmeta.server.rounds import Policy, RoundsState
from fedmeta.server.runstate import RunState
from fedmeta.server.steering import Steering

DEFAULT_PAGE = 100
MAX_PAGE = 500


class Observed(Protocol):
    """What the snapshot reads of server.coordinator.Coordinator."""

    _cond: Any
    policy: Policy
    registry: Registry
    state: RoundsState
    runstate: RunState
    stats: ClientStats
    steering: Steering
    summary: dict[str, Any] | None
    finished: Any
    failed: Any
    config: Any

    def clock(self) -> float: ...

    @property
    def version(self) -> str: ...


def _phase(c: Observed, rnd: Any) -> str:
    if c.failed.is_set():
        return "failed"
    if c.finished.is_set():
        return "finished"
    if c.steering.stopped.is_set():
        return "stopped"
    if rnd is not None:
        return "validating" if rnd.validation else "evaluating" if rnd.evaluation else "training"
    if c.steering.stop_requested:
        return "stopping"
    return "paused" if c.steering.paused else "waiting"


def _state(info: Any, rnd: Any, revoked: bool, index: int) -> str:
    if revoked:
        return "revoked"
    if info.left:
        return "left"
    if rnd is not None and info.client_id in rnd.answered:
        return "answered"
    if rnd is not None and info.client_id in rnd.sampled:
        return "training"
    if info.benched_until > index:
        return "benched"
    return "waiting" if info.polling > 0 else "idle"


def snapshot(c: Observed, *, offset: int = 0, limit: int = 0) -> admin_pb.GetStatusResponse:
    """The run's state and clients[offset:offset + limit] (limit 0: DEFAULT_PAGE; at most MAX_PAGE)."""
    limit = min(limit or DEFAULT_PAGE, MAX_PAGE)
    with c._cond:  # copies only, O(registry) at most: no sorting and no message building under the lock
        now = c.clock()
        rnd = c.state.round
        reg = c.registry
        registered, revoked = list(reg.clients), set(reg.revoked)
        live = sum(1 for i in reg.clients.values() if reg.is_live(i, now))
        policy = c.policy
        run = admin_pb.RunStatus(
            run_id=c.config.run.run_id, algorithm=c.config.run.algorithm, task=c.config.run.task,
            rounds_done=c.state.next_round, rounds_total=c.config.rounds, phase=_phase(c, rnd),
            paused=c.steering.paused, stop_requested=c.steering.stop_requested,
            round_deadline_s=policy.round_deadline_s, min_clients=policy.min_clients,
            clients_per_round=policy.clients_per_round, clients_live=live,
            clients_registered=len(registered), clients_revoked=len(revoked),
            open_round=rnd.index if rnd is not None else -1,
            open_sampled=len(rnd.sampled | rnd.answered) if rnd is not None else 0,
            open_answered=len(rnd.answered) if rnd is not None else 0,
            open_round_age_s=now - rnd.started if rnd is not None else 0.0,
            parameter_version=c.version, wall_s=c.runstate.wall_s,
            bytes_sent=c.runstate.bytes_sent, bytes_received=c.runstate.bytes_received)
        summary = c.summary
    ids = sorted(set(registered) | revoked)
    page = ids[offset:offset + limit]
    rows = []
    with c._cond:  # the page's rows: at most MAX_PAGE lookups
        index = c.state.next_round
        for cid in page:
            info = reg.clients.get(cid)
            if info is None:
                rows.append((cid, "revoked" if cid in reg.revoked else "forgotten", -1.0, 0, ""))
            else:
                rows.append((cid, _state(info, c.state.round, cid in reg.revoked, index), now - info.last_seen,
                             info.answered, info.device))
    pace = c.stats.pace()
    run.rounds_per_minute = pace
    left = max(0, run.rounds_total - run.rounds_done)
    run.eta_s = 0.0 if left == 0 else (60.0 * left / pace if pace > 0 else -1.0)
    counters = c.stats.copy(page)
    response = admin_pb.GetStatusResponse(run=run, clients_total=len(ids))
    for cid, state, last_seen, answered, device in rows:
        entry = response.clients.add(client_id=cid, state=state, last_seen_s=max(last_seen, -1.0),
                                     rounds_trained=answered, device=device)
        found = counters["clients"].get(cid)
        if found is not None:
            entry.compute_s, entry.bytes_sent, entry.bytes_received = found[0], found[1], found[2]
            for reason, count, message in found[3]:
                entry.refusals.add(reason=reason, count=count, last_message=message)
    for r in counters["rounds"]:
        response.rounds.add(**r)
    for v in counters["validations"]:
        response.validations.add(**v)
    response.last_metrics.update({k: v for k, v in counters["last_metrics"].items()})
    for reason, count, message in counters["refusals"]:
        response.refusals.add(reason=reason, count=count, last_message=message)
    if summary is not None:
        _evaluation(response, summary.get("eval") or {})
    return response


def _evaluation(response: admin_pb.GetStatusResponse, ev: dict[str, Any]) -> None:
    curve = ev.get("curve")
    if isinstance(curve, list):
        response.adaptation_curve.extend(float(x) for x in curve[:1000] if isinstance(x, (int, float)))
        response.adaptation_metric = str(ev.get("curve_metric", ""))
    key = "accuracy" if ev.get("accuracy_post") is not None else "loss"
    before, after = ev.get(f"{key}_pre"), ev.get(f"{key}_post")
    response.eval_before = float(before) if isinstance(before, (int, float)) else math.nan
    response.eval_after = float(after) if isinstance(after, (int, float)) else math.nan
