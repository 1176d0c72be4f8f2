"""The coordinator: one lock and the wiring of its parts; one instance per run.

No gRPC here beyond status codes: the service (server/service.py) turns RPCs into calls
on Coordinator, which raises Rejected(code, message, reason) (server/errors.py) for bad ones.

    registry.py   join, leave, heartbeats, leases, caps, purging, benching
    broadcast.py  θ's version, encoded payloads, readers, step in place or on a copy
    admission.py  every check of an update: admit(header) -> ticket, commit(ticket, tensors)
    rounds.py     open / close / resample / wait as pure functions of state, clients and now
    runstate.py   resume, checkpoints, best validation, metrics records, summary

A round: sample clients -> they fetch θ and submit updates, summed into a streaming
weighted mean as they arrive -> the round thread closes the round (rounds.decide) -> outer
step, new version, checkpoint, metrics. After the last training round an evaluation round
collects pre/post-adaptation losses, then the run is FINISHED.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
import torch

from common.aggregation import FlatLayout, NormFilter, make_aggregator
from common.algorithms import OuterConfig, get_algorithm, meta_parameters
from common.algorithms.outer import guarded_step
from common.codec import EncodedTensorSet, TensorSetHeader, TensorSpec
from common.config import RunConfig
from common.refusal import Reason
from server import rounds
from server.admission import Admission, Ticket, UpdateMeta, assigned_tasks, check_run, check_values
from server.broadcast import Broadcast, version_of
from server.config import ServerConfig
from server.errors import Rejected
from server.registry import ClientInfo, Registry
from server.rounds import Close, Open, Resample, Round, RoundsState, Wait
from server.runstate import RunState

__all__ = ["Action", "Assignment", "ClientInfo", "Coordinator", "Rejected", "Round", "Ticket", "UpdateMeta"]

log = logging.getLogger("fedmeta.coordinator")


def _few(ids: set[str] | frozenset[str], shown: int = 10) -> str:
    """At most `shown` ids for a log line, and how many more (a log line stays short)."""
    if not ids:
        return "none"
    names = sorted(ids)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


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


class Coordinator:
    """Holds θ and runs rounds; thread-safe (one condition variable guards every part)."""

    def __init__(self, config: ServerConfig, *, on_round: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.run: RunConfig = config.run
        self.algorithm = get_algorithm(self.run.algorithm)
        self.clock = clock
        self._on_round = on_round
        self._cond = threading.Condition()
        self._uploads = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self._stopping = threading.Event()
        self.finished = threading.Event()
        self.failed = threading.Event()  # the round thread stopped on an error: not a finished run
        self._thread: threading.Thread | None = None
        self._purged_at = 0.0
        self.error: str | None = None
        self.summary: dict[str, Any] | None = None

        params = meta_parameters(self.run, self.run.seed)
        self.layout = FlatLayout.of(params)
        self.specs: tuple[TensorSpec, ...] = self.layout.specs
        self.outer = self.algorithm.make_outer(OuterConfig(lr=config.outer_lr, rounds=config.rounds,
                                                           cosine=self.run.cosine_outer))
        self.policy = rounds.Policy(self.run, config.rounds, config.clients_per_round, config.min_clients,
                                    config.round_deadline_s)
        self.state = RoundsState(waiting_since=clock())
        self.registry = Registry(run_id=self.run.run_id, max_clients=config.max_clients,
                                 forget_client_s=config.forget_client_s, max_silent_rounds=config.max_silent_rounds,
                                 lease_s=2 * self.run.poll_timeout_s + 5.0)
        norm_refusal = None if config.aggregator == "clipped-mean" else config.max_update_norm  # clipped-mean scales
        self.admission = Admission(self.run, self.specs, self.algorithm.update_kind,
                                   max_update_bytes=config.max_update_bytes, max_update_norm=norm_refusal,
                                   norm_filter=NormFilter(factor=config.norm_clip_factor,
                                                          window=config.norm_clip_window,
                                                          warmup=config.norm_clip_warmup))
        self.runstate = RunState(config, clock)
        self.rundir = self.runstate.rundir
        theta = self.runstate.resume(numel=self.layout.numel, version_of=self._version_of, outer=self.outer,
                                     registry=self.registry, rounds=self.state)
        self.broadcast = Broadcast(self.layout, self.layout.flatten(params) if theta is None else theta,
                                   encoding=self.run.encoding, chunk_bytes=self.run.chunk_bytes)
        self.runstate.started = clock()

    # ---- views of the parts (read by the service, the CLI and tests) ---------------------------
    @property
    def version(self) -> str:
        return self.broadcast.version

    @property
    def next_round(self) -> int:
        return self.state.next_round

    @property
    def evaluation_done(self) -> bool:
        return self.state.evaluation_done

    @property
    def clients_seen(self) -> int:
        return self.registry.seen

    @property
    def best(self) -> Any:
        return self.runstate.best

    @property
    def wall_s(self) -> float:
        return self.runstate.wall_s

    @property
    def bytes_sent(self) -> int:
        return self.runstate.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.runstate.bytes_received

    @property
    def _round(self) -> Round | None:
        return self.state.round

    @property
    def _clients(self) -> dict[str, ClientInfo]:
        return self.registry.clients

    @property
    def _accepted(self) -> dict[tuple[int, bool], set[str]]:
        return self.admission.accepted

    @property
    def _norm_filter(self) -> NormFilter:
        return self.admission.norm_filter

    def parameters(self) -> dict[str, torch.Tensor]:
        """The current meta-parameters as named views (read-only by convention)."""
        return self.broadcast.parameters()

    def count_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        self.runstate.count_bytes(sent=sent, received=received)

    def _version_of(self, theta: torch.Tensor) -> str:
        """The parameter version of a flat θ read from a checkpoint: the digest publishing it would give."""
        if theta.dtype != torch.float32 or theta.dim() != 1 or theta.numel() != self.layout.numel:
            raise ValueError(f"checkpoint in {self.config.run_dir}: θ has {theta.numel()} {theta.dtype} values, "
                             f"the model has {self.layout.numel} float32 ones")
        return version_of(self.layout, theta)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._round_loop, name="fedmeta-rounds", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Stop opening rounds; waiting long-polls answer UNAVAILABLE (clients retry) at once."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        """begin_stop(), then wait for the round thread (a checkpoint being written is finished)."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _check_available(self) -> None:
        if not self._stopping.is_set() or self.finished.is_set():
            return
        if self.failed.is_set():
            raise Rejected(grpc.StatusCode.UNAVAILABLE,
                           f"the coordinator stopped on an error ({self.error}); retry: a restarted coordinator "
                           "resumes the run from its last checkpoint", Reason.STOPPING)
        raise Rejected(grpc.StatusCode.UNAVAILABLE,
                       "the coordinator is shutting down; retry: a restarted coordinator resumes the run from its "
                       "last checkpoint", Reason.STOPPING)

    # ---- registry RPCs --------------------------------------------------------------------------
    def join(self, client_id: str, *, device: str, num_tasks: int) -> RunConfig:
        with self._cond:
            self._check_available()
            rnd = self.state.round
            self.registry.join(client_id, device=device, num_tasks=num_tasks, now=self.clock(),
                               busy=rnd.sampled if rnd is not None else ())
            self._cond.notify_all()
        return self.run

    def leave(self, client_id: str) -> None:
        with self._cond:
            self.registry.leave(client_id)
            rnd = self.state.round
            if rnd is not None and client_id in rnd.sampled and client_id not in rnd.answered:
                rnd.sampled.discard(client_id)
                rnd.dropped.add(client_id)
            log.log(logging.DEBUG if self.finished.is_set() else logging.INFO, "client %s left", client_id)
            self._cond.notify_all()

    def heartbeat(self, client_id: str, round_index: int) -> bool:
        """A computing client is alive: renew its lease. Returns whether its round still wants it."""
        with self._cond:
            self.registry.touch(client_id, self.clock())
            rnd = self.state.round
            return (rnd is not None and rnd.index == round_index and client_id in rnd.sampled
                    and client_id not in rnd.answered)

    def check_run(self, run_id: str) -> None:
        check_run(run_id, self.run.run_id)

    def wait(self, client_id: str, timeout_s: float, is_active: Callable[[], bool] = lambda: True) -> Assignment:
        """Long-poll: block until this client has work, the run finishes, or timeout_s passes.

        is_active reports whether the caller is still connected; a dead caller stops
        counting as a live client within a second.
        """
        deadline = self.clock() + timeout_s
        with self._cond:
            info = self.registry.known(client_id)
            if info.polling > 0:
                deadline = 0.0  # one long-poll per client id: a second one is answered at once
            info.polling += 1
            try:
                while True:
                    self._check_available()
                    info.last_seen = self.clock()
                    assignment = self._assignment_for(client_id)
                    remaining = deadline - self.clock()
                    if assignment.action != Action.WAIT or remaining <= 0 or not is_active():
                        if assignment.action == Action.FINISHED:
                            info.told_finished = True
                        return assignment
                    self._cond.wait(timeout=min(remaining, 1.0))
                    if info.left:
                        raise Rejected(grpc.StatusCode.NOT_FOUND, f"client {client_id!r} left the run",
                                       Reason.NOT_JOINED)
            finally:
                info.polling -= 1
                info.last_seen = self.clock()

    def _assignment_for(self, client_id: str) -> Assignment:
        if self.finished.is_set():
            return Assignment(Action.FINISHED, detail="the run is finished")
        rnd = self.state.round
        if rnd is None:
            return Assignment(Action.WAIT, detail="waiting for clients to start the next round")
        if client_id in rnd.sampled and client_id not in rnd.answered:
            action = Action.EVALUATE if rnd.evaluation else Action.TRAIN
            return Assignment(action, rnd.index, rnd.version, validation=rnd.validation)
        return Assignment(Action.WAIT, detail=f"round {rnd.index} is in progress without you")

    def clients_pending_finish(self) -> int:
        """Live clients that have not yet been told the run is finished."""
        with self._cond:
            return sum(1 for cid in self.registry.live(self.clock()) if not self.registry.clients[cid].told_finished)

    # ---- broadcast RPCs -------------------------------------------------------------------------
    def inline_parameters(self, version: str) -> tuple[TensorSetHeader, bytes] | None:
        """A copy of version's encoded parameters if they fit in one chunk (to inline them), else None."""
        with self._cond:
            return self.broadcast.inline(version)

    def acquire_parameters(self, client_id: str, version: str) -> EncodedTensorSet:
        """The encoded current parameters, held for a stream until release_parameters()."""
        with self._cond:
            self.registry.touch(client_id, self.clock())
            return self.broadcast.acquire(version)

    def release_parameters(self) -> None:
        with self._cond:
            self.broadcast.release()

    # ---- admission ----------------------------------------------------------------------------------
    def admit(self, meta: UpdateMeta) -> Ticket:
        """Every check of an update's header, before its payload is read (server/admission.py)."""
        self.check_run(meta.run_id)
        with self._cond:
            self.registry.touch(meta.client_id, self.clock())
            ticket = self.admission.admit(meta, self.state.round)
        return self.admission.weigh(ticket)

    def commit(self, ticket: Ticket, tensors: Mapping[str, torch.Tensor] | None) -> bool:
        """Check an admitted update's values and count it once. Returns True if it was a duplicate."""
        if ticket.duplicate:
            return True
        norm = check_values(tensors, self.admission.max_update_norm) if tensors is not None else 0.0  # O(model)
        with self._cond:
            rnd, duplicate = self.admission.count(ticket, self.state.round, tensors, norm)
            cid = ticket.meta.client_id
            if rnd is not None and (not rnd.sampled - rnd.answered or (cid in rnd.proven and rnd.proven <= rnd.answered)):
                # Only the round thread cares, and only once every sampled client answered (it
                # wakes at the deadline by itself): waking every waiting long-poll on every
                # update cost 256 clients half the coordinator's CPU (benchmarks/load_clients.py).
                self._cond.notify_all()
        return duplicate

    def assigned_tasks(self, meta: UpdateMeta) -> int:
        """The most an update may weigh: the tasks the coordinator assigned a client for the round."""
        return assigned_tasks(self.run, meta)

    def upload_slot(self) -> threading.BoundedSemaphore:
        """Bounds how many update payloads are buffered at once (memory: one model each)."""
        return self._uploads

    # ---- the round thread -------------------------------------------------------------------------
    def _clients_view(self, now: float) -> rounds.Clients:
        r = self.registry
        return rounds.Clients(r.live(now), r.answered_counts(), r.benched_until())

    def _round_loop(self) -> None:
        try:
            while not self._stopping.is_set() and not self.finished.is_set():
                closing = None
                with self._cond:
                    now = self.clock()
                    if now - self._purged_at > min(5.0, self.config.forget_client_s / 2):
                        self._purged_at = now
                        rnd = self.state.round
                        self.registry.purge(now, busy=rnd.sampled if rnd is not None else ())
                    decision = rounds.decide(self.policy, self.state, self._clients_view(now), now,
                                             stopping=self._stopping.is_set())
                    if isinstance(decision, Open):
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
        except Exception as exc:
            # A failed run is not a finished run: waiting clients are told UNAVAILABLE and keep
            # retrying (--give-up-s); the coordinator exits 1; restarted with the same --run-dir
            # it resumes from the last checkpoint.
            if isinstance(exc, OSError):
                log.error("the round thread failed: %s; stopping the run (free the space or fix the run "
                          "directory, then restart with the same --run-dir to resume)", exc)
            else:
                log.exception("the round thread failed; stopping the run")
            self.error = str(exc)
            with self._cond:
                self.failed.set()
                self._stopping.set()
                self._cond.notify_all()

    def _wait(self, decision: Wait, now: float) -> None:
        rnd = self.state.round
        if rnd is not None and decision.proven_done is not None:
            rnd.proven_done = decision.proven_done
        wait = 0.5 if decision.until is None else max(0.0, decision.until - now)
        self._cond.wait(timeout=min(wait, 0.5))

    def _open(self, decision: Open) -> None:
        accumulator = None
        if not decision.evaluation:
            accumulator = make_aggregator(self.config.aggregator, self.layout,
                                          max_norm=self.config.max_update_norm, trim=self.config.trim_fraction)
        self.state.round = decision.round(self.broadcast.version, accumulator)
        if decision.short_of:
            log.info("round %d starts with %d of %d clients (only %d live after %.0f s)", decision.index,
                     len(decision.sampled), self.policy.clients_per_round, decision.short_of, decision.waited_s)
        self._cond.notify_all()

    def _try_open(self) -> None:
        now = self.clock()
        opened = rounds.plan_open(self.policy, self.state, self._clients_view(now), now,
                                  stopping=self._stopping.is_set())
        if opened is not None:
            self._open(opened)

    def _resample(self, change: Resample, now: float) -> None:
        rnd = self.state.round
        assert rnd is not None
        asked = len(rnd.sampled | rnd.answered)
        rounds.apply_resample(rnd, change)
        log.warning("round %d: deadline passed with %d of %d answers (quorum %d); dropped unreachable %s, "
                    "added %s, waiting %g s more", rnd.index, len(rnd.answered), asked,
                    rounds.quorum(self.policy, rnd), _few(change.gone), _few(change.added),
                    self.config.round_deadline_s)
        self._cond.notify_all()

    def _tally(self, rnd: Round) -> None:
        self.state.round = None
        self.state.explore_at, self.state.explore_misses = rounds.explore_after(rnd, self.state)
        self.registry.tally(rnd.index, rnd.answered, (rnd.sampled | rnd.dropped) - rnd.answered)

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
        with self._cond:
            in_place = self.broadcast.begin_step()  # no new reader of the old version from here on
        # Step in place unless a straggler is still streaming the old buffer: O(model) memory.
        theta = self.broadcast.theta if in_place else self.broadcast.theta.clone()
        lr = guarded_step(self.outer, theta, rnd.accumulator.take_mean(), rnd.index)
        rnd.accumulator = None
        if lr is None:
            self._log_undone(rnd)
        with self._cond:
            self.broadcast.publish(theta)
            self.state.next_round = rnd.index + 1
            self.state.waiting_since = self.clock()
            self.admission.forget_before(rnd.index)
            round_s = self.clock() - rnd.started
            # Clients start the next round while this thread writes the checkpoint: only this
            # thread changes theta and the optimizer state, so what it writes is consistent.
            self._try_open()
        if self.next_round % self.config.checkpoint_every == 0 or self.next_round == self.config.rounds:
            self._save_checkpoint()
        self._record(self.runstate.round_record(rnd, metrics, lr=lr, round_s=round_s, version=self.version))

    def _record(self, record: dict[str, Any]) -> None:
        self.rundir.append_metrics(record)
        if self._on_round is not None:
            self._on_round(record)

    def _save_checkpoint(self) -> None:
        with self._cond:
            meta = self.runstate.meta(rounds=self.state, version=self.version, clients=self.registry.records(),
                                      seen=self.registry.seen)
        self.runstate.save(self.broadcast.theta, self.outer, meta)

    def _validated(self, rnd: Round, metrics: dict[str, float]) -> None:
        """A validation closed: record it, export θ to model-best/ if it is the best so far."""
        entry = self.runstate.validated(rnd, metrics, self.parameters(), self.version)
        with self._cond:
            self.state.validated_through = rnd.index
            self.state.waiting_since = self.clock()
            self._try_open()
        self._save_checkpoint()  # the best so far survives a restart
        self._record(entry)

    def _log_undone(self, rnd: Round) -> None:
        """An outer step left theta or the optimiser state non-finite and was undone: name the suspects."""
        ranked = sorted(rnd.norms.items(), key=lambda kv: (math.isfinite(kv[1]), -kv[1]))[:5]
        suspects = ", ".join(f"{cid} (norm {norm:.3g})" for cid, norm in ranked) or "none"
        log.error("round %d: the outer step made theta or the optimiser state non-finite; undone (theta, its "
                  "version and the optimiser state are as before the round). Largest updates of the round's %d: "
                  "%s. If no update stands out, lower --outer-lr", rnd.index, len(rnd.norms), suspects)

    def _finish(self, rnd: Round, metrics: dict[str, float]) -> None:
        self.summary = self.runstate.summary(rnd, metrics, self.parameters(), version=self.version,
                                             rounds_completed=self.next_round, clients_seen=self.clients_seen)
        with self._cond:
            self.state.evaluation_done = True
            self.finished.set()
            self._cond.notify_all()
        log.info("run finished: %d rounds, evaluation on %d held-out tasks", self.next_round,
                 self.summary["eval"]["tasks"])
