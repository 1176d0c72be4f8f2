"""The round thread: applies the round policy's decisions (server/rounds.py) and closes rounds.

Closing a training round: the outer step on θ (in place, or on a copy while a stream still
reads θ), a new version, the next round opened at once, then the checkpoint (every
--checkpoint-every rounds) and the metrics record, outside the lock: only this thread
changes θ and the optimiser state, so what it writes is consistent. A validation round
records its result and may export model-best/; the final evaluation writes the summary.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.algorithms.base import OuterStep
from fedmeta.common.clusters import ClusteredAggregator, ClusterState, guarded_cluster_step
from fedmeta.common.logformat import fields
from fedmeta.common.round_aggregator import make_round_aggregator
from fedmeta.server import buffered, rounds
from fedmeta.server.admission import Admission
from fedmeta.server.broadcast import Broadcast
from fedmeta.server.buffered import Drop, Step
from fedmeta.server.options import ServerConfig
from fedmeta.server.registry import Registry
from fedmeta.server.rounds import Close, Open, Resample, Round, RoundsState, Wait
from fedmeta.server.rundir import RunDir
from fedmeta.server.runstate import RunState
from fedmeta.server.clientstats import ClientStats
from fedmeta.server.steering import Steering


class Coordinator(Protocol):
    """What the round thread uses of server.coordinator.Coordinator (typed here: no import back)."""

    config: ServerConfig
    clock: Callable[[], float]
    _cond: threading.Condition
    _stopping: threading.Event
    finished: threading.Event
    failed: threading.Event
    error: str | None
    summary: dict[str, Any] | None
    _on_round: Callable[[dict[str, Any]], None] | None
    state: RoundsState
    policy: rounds.Policy
    registry: Registry
    admission: Admission
    broadcast: Broadcast
    outer: OuterStep
    layout: FlatLayout
    rundir: RunDir
    runstate: RunState
    stats: ClientStats
    steering: Steering
    clusters: ClusterState

    def holding(self) -> bool: ...
    buffered: Any  # server.buffered_run.BufferedRounds | None (--schedule buffered)

    def parameters(self) -> dict[str, torch.Tensor]: ...

    @property
    def version(self) -> str: ...

    @property
    def next_round(self) -> int: ...

    @property
    def clients_seen(self) -> int: ...

    def _clients_view(self, now: float) -> rounds.Clients: ...

    def busy(self) -> set[str]: ...

log = logging.getLogger("fedmeta.coordinator")


def _few(ids: set[str] | frozenset[str], shown: int = 10) -> str:
    """At most `shown` ids for a log line, and how many more (a log line stays short)."""
    if not ids:
        return "none"
    names = sorted(ids)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


class RoundThread:
    """The coordinator's one background thread; every change it makes is under the coordinator's lock."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._purged_at = 0.0

    def run(self) -> None:
        try:
            while not self.c._stopping.is_set() and not self.c.finished.is_set():
                closing = None
                stepping = False
                with self.c._cond:
                    stop_now = self.c.steering.stop_requested and self.c.state.round is None
                    now = self.c.clock()
                    if now - self._purged_at > min(5.0, self.c.config.forget_client_s / 2):
                        self._purged_at = now
                        self.c.registry.purge(now, busy=self.c.busy())
                    decision = self._decide(now)
                    if stop_now:
                        break
                    if isinstance(decision, Step):
                        stepping = True
                    elif isinstance(decision, Drop):
                        self.c.buffered.drop(decision)
                    elif isinstance(decision, Open):
                        self._open(decision)
                    elif isinstance(decision, Close):
                        closing = decision.round
                        self._tally(closing)
                    elif isinstance(decision, Resample):
                        self._resample(decision, now)
                    else:
                        self._wait(decision, now)
                if closing is not None:
                    self._close(closing)
                if stepping:
                    self.c.buffered.step(self)
            if not self.c.finished.is_set() and self.c.steering.stop_requested and not self.c._stopping.is_set():
                self._clean_stop()
        except Exception as exc:
            # A failed run is not a finished run: waiting clients are told UNAVAILABLE and keep
            # retrying (--give-up-s); the coordinator exits 1; restarted with the same --run-dir
            # it resumes from the last checkpoint.
            if isinstance(exc, OSError):
                log.error("the round thread failed: %s; stopping the run (free the space or fix the run "
                          "directory, then restart with the same --run-dir to resume)", exc)
            else:
                log.exception("the round thread failed; stopping the run")
            self.c.error = str(exc)
            with self.c._cond:
                self.c.failed.set()
                self.c._stopping.set()
                self.c._cond.notify_all()

    def _decide(self, now: float) -> buffered.Decision:
        view, stopping = self.c._clients_view(now), self.c.holding()
        if self.c.buffered is not None:
            return buffered.decide(self.c.policy, self.c.buffered.policy, self.c.state, self.c.buffered.state, view,
                                   now, stopping=stopping)
        return rounds.decide(self.c.policy, self.c.state, view, now, stopping=stopping)

    def _wait(self, decision: Wait, now: float) -> None:
        rnd = self.c.state.round
        if rnd is not None and decision.proven_done is not None:
            rnd.proven_done = decision.proven_done
        wait = 0.5 if decision.until is None else max(0.0, decision.until - now)
        self.c._cond.wait(timeout=min(wait, 0.5))

    def _open(self, decision: Open) -> None:
        accumulator = None
        if not decision.evaluation:
            joint = self.c.clusters.split_round is None
            accumulator = make_round_aggregator(
                self.c.config.aggregator, self.c.layout, max_norm=self.c.config.max_update_norm,
                trim=self.c.config.trim_fraction, clusters=self.c.config.run.clusters, joint=joint,
                try_split=joint and decision.index >= self.c.config.cluster_warmup)
        self.c.state.round = decision.round(self.c.broadcast.version, accumulator)
        if decision.short_of:
            log.info("round %d starts with %d of %d clients (only %d live after %.0f s)", decision.index,
                     len(decision.sampled), self.c.policy.clients_per_round, decision.short_of, decision.waited_s,
                     extra=fields(event="round_short", round=decision.index))
        self.c._cond.notify_all(polls=decision.sampled)  # only the sampled clients' long-polls wake

    def _try_open(self) -> None:
        now = self.c.clock()
        opened = rounds.plan_open(self.c.policy, self.c.state, self.c._clients_view(now), now,
                                  stopping=self.c.holding())
        if opened is not None and (self.c.buffered is None or opened.evaluation):  # buffered: no training rounds
            self._open(opened)

    def _resample(self, change: Resample, now: float) -> None:
        rnd = self.c.state.round
        assert rnd is not None
        asked = len(rnd.sampled | rnd.answered)
        rounds.apply_resample(rnd, change)
        log.warning("round %d: deadline passed with %d of %d answers (quorum %d); dropped unreachable %s, "
                    "added %s, waiting %g s more", rnd.index, len(rnd.answered), asked,
                    rounds.quorum(self.c.policy, rnd), _few(change.gone), _few(change.added),
                    self.c.config.round_deadline_s, extra=fields(event="round_resampled", round=rnd.index))
        self.c._cond.notify_all()

    def _tally(self, rnd: Round) -> None:
        self.c.state.round = None
        self.c.state.explore_at, self.c.state.explore_misses = rounds.explore_after(rnd, self.c.state)
        self.c.registry.tally(rnd.index, rnd.answered, (rnd.sampled | rnd.dropped) - rnd.answered)

    def _close(self, rnd: Round) -> None:
        # Each metric is averaged over the clients that sent it: one that leaves one out cannot pull it to 0.
        metrics = {k: v / rnd.metric_weights[k] for k, v in rnd.metric_sums.items() if rnd.metric_weights.get(k)}
        if rnd.validation:
            self._validated(rnd, metrics)
        elif rnd.evaluation:
            self._finish(rnd, metrics)
        else:
            self._step(rnd, metrics)

    def _step(self, rnd: Round, metrics: dict[str, float]) -> None:
        assert rnd.accumulator is not None
        with self.c._cond:
            in_place = self.c.broadcast.begin_step()  # no new reader of the old version from here on
        # Step in place unless a straggler is still streaming the old buffer: O(model) memory.
        theta = self.c.broadcast.theta if in_place else self.c.broadcast.theta.clone()
        accumulator = rnd.accumulator
        update = accumulator.take_mean()
        idle = accumulator.idle if isinstance(accumulator, ClusteredAggregator) else []
        lr = guarded_cluster_step(self.c.outer, theta, update, rnd.index, idle)
        extra = self._aggregation_report(rnd, accumulator)
        rnd.accumulator = None
        if lr is None:
            self._log_undone(rnd)
        with self.c._cond:
            self.c.broadcast.publish(theta)
            self.c.state.next_round = rnd.index + 1
            self.c.state.waiting_since = self.c.clock()
            self.c.admission.forget_before(rnd.index)
            round_s = self.c.clock() - rnd.started
            # Clients start the next round while this thread writes the checkpoint: only this
            # thread changes theta and the optimizer state, so what it writes is consistent.
            self._try_open()
        if self.c.next_round % self.c.config.checkpoint_every == 0 or self.c.next_round == self.c.config.rounds:
            self._save_checkpoint()
        self._record(self.c.runstate.round_record(rnd, metrics, lr=lr, round_s=round_s, version=self.c.version)
                     | extra)

    def _aggregation_report(self, rnd: Round, accumulator: object) -> dict[str, Any]:
        """What the aggregator tells metrics.jsonl: task-aware agreement, cluster counts and members."""
        report = getattr(accumulator, "report", None)
        extra: dict[str, Any] = dict(report()) if callable(report) else {}
        if isinstance(accumulator, ClusteredAggregator):
            members = dict(rnd.cluster_of)
            if accumulator.split_now and accumulator.groups is not None:
                order = list(rnd.cluster_of)  # the order the updates were added in
                members = {order[i]: g for g, group in enumerate(accumulator.groups) for i in group}
                self.c.clusters.split_round = rnd.index
                log.info("round %d: the clusters split into groups of %s updates", rnd.index,
                         [len(g) for g in accumulator.groups])
            inner = [getattr(a, "report", None) for a in accumulator.inner]
            extra |= {"cluster_members": members, "cluster_split_round": self.c.clusters.split_round}
            extra |= {f"cluster_{j}": r() for j, r in enumerate(inner) if callable(r) and r()}
        return extra

    def _record(self, record: dict[str, Any]) -> None:
        self.c.runstate.record(record)
        self.c.stats.observe(record)
        if self.c._on_round is not None:
            self.c._on_round(record)

    def _save_checkpoint(self) -> None:
        with self.c._cond:
            meta = self.c.runstate.meta(rounds=self.c.state, version=self.c.version, clients=self.c.registry.records(),
                                        seen=self.c.registry.seen, revoked=sorted(self.c.registry.revoked),
                                        clusters=self.c.clusters)
            if self.c.buffered is not None:
                meta["buffered"] = self.c.buffered.meta()
        self.c.runstate.save(self.c.broadcast.theta, self.c.outer, meta)

    def _clean_stop(self) -> None:
        """The operator's stop (server/steering.py): no round open; checkpoint, export θ to model/, stop."""
        self._save_checkpoint()
        self.c.rundir.export_model(self.c.parameters(), self.c.config.run, self.c.version)
        log.warning("stopped by the operator after %d rounds: checkpoint and model/ written; restart with the same "
                    "--run-dir to resume", self.c.next_round)
        with self.c._cond:
            self.c.steering.stopped.set()
            self.c._stopping.set()
            self.c._cond.notify_all()

    def _validated(self, rnd: Round, metrics: dict[str, float]) -> None:
        """A validation closed: record it, export θ to model-best/ if it is the best so far."""
        entry = self.c.runstate.validated(rnd, metrics, self.c.parameters(), self.c.version)
        with self.c._cond:
            self.c.state.validated_through = rnd.index
            self.c.state.waiting_since = self.c.clock()
            self._try_open()
        self._save_checkpoint()  # the best so far survives a restart
        self._record(entry)

    def _log_undone(self, rnd: Round) -> None:
        """An outer step left theta or the optimiser state non-finite and was undone: name the suspects."""
        ranked = sorted(rnd.norms.items(), key=lambda kv: (math.isfinite(kv[1]), -kv[1]))[:5]
        suspects = ", ".join(f"{cid} (norm {norm:.3g})" for cid, norm in ranked) or "none"
        log.error("round %d: the outer step made theta or the optimiser state non-finite; undone (theta, its "
                  "version and the optimiser state are as before the round). Largest updates of the round's %d: "
                  "%s. If no update stands out, lower --outer-lr", rnd.index, len(rnd.norms), suspects,
                  extra=fields(event="step_undone", round=rnd.index))

    def _finish(self, rnd: Round, metrics: dict[str, float]) -> None:
        self.c.summary = self.c.runstate.summary(rnd, metrics, self.c.parameters(), version=self.c.version,
                                             rounds_completed=self.c.next_round, clients_seen=self.c.clients_seen)
        with self.c._cond:
            self.c.state.evaluation_done = True
            self.c.finished.set()
            self.c._cond.notify_all()
        log.info("run finished: %d rounds, evaluation on %d held-out tasks", self.c.next_round,
                 self.c.summary["eval"]["tasks"], extra=fields(event="run_finished", round=rnd.index))
