"""The coordinator: one lock and the wiring of its parts; one instance per run.

No gRPC here beyond status codes: the service (server/service.py) turns RPCs into calls
on Coordinator, which raises Rejected(code, message, reason) (server/errors.py) for bad ones.

    longpoll.py   what a waiting client is told, and the long-poll coroutine
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

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import torch

from fedmeta.common.aggregation import FlatLayout, NormFilter
from fedmeta.common.algorithms import OuterConfig, get_algorithm, meta_parameters
from fedmeta.common.clusters import ClusterState, stack
from fedmeta.common.codec import EncodedTensorSet, TensorSetHeader, TensorSpec
from fedmeta.common.config import RunConfig
from fedmeta.common.logformat import fields
from fedmeta.common.refusal import Reason
from fedmeta.server import longpoll, rounds
from fedmeta.server.admission import (Admission, Ticket, UpdateMeta, assigned_tasks, check_cluster, check_run,
                                      check_values)
from fedmeta.server.broadcast import Broadcast, Wire, WireCache, version_of
from fedmeta.server.clientstats import ClientStats
from fedmeta.server.buffered_run import BufferedRounds
from fedmeta.server.changes import Changes
from fedmeta.server.longpoll import Action, Assignment
from fedmeta.server.config import ServerConfig
from fedmeta.server.errors import Rejected
from fedmeta.server.registry import ClientInfo, Registry
from fedmeta.server.rounds import Round, RoundsState
from fedmeta.server.round_thread import RoundThread
from fedmeta.server.runstate import RunState
from fedmeta.server.steering import Steering, read_revoked
from fedmeta.server.telemetry import Telemetry
from fedmeta.server.validation import Best

__all__ = ["Action", "Assignment", "ClientInfo", "Coordinator", "Rejected", "Round", "Ticket", "UpdateMeta"]

log = logging.getLogger("fedmeta.coordinator")
JOIN_NOTIFY_S = 0.05  # Joins wake the round thread at most this often (it also wakes every 0.5 s)


class Coordinator:
    """Holds θ and runs rounds; thread-safe (one condition variable guards every part)."""

    def __init__(self, config: ServerConfig, *, on_round: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.run: RunConfig = config.run
        self.algorithm = get_algorithm(self.run.algorithm)
        self.clock = clock
        self._on_round = on_round
        self._cond = Changes()
        self._join_notified = -1e9
        # taken by the service's coroutines (server/service.py), on its event loop
        self._uploads = asyncio.Semaphore(config.max_concurrent_uploads)
        self._downloads = asyncio.Semaphore(config.max_concurrent_downloads)
        self._wire = WireCache(config.run.chunk_bytes)
        self._stopping = threading.Event()
        self.finished = threading.Event()
        self.failed = threading.Event()  # the round thread stopped on an error: not a finished run
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.summary: dict[str, Any] | None = None

        params = stack(meta_parameters(self.run, self.run.seed), self.run.clusters)  # K identical θ's (--clusters)
        self.clusters = ClusterState()
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
        self.stats = ClientStats(config.max_clients, clock)
        norm_refusal = None if config.aggregator == "clipped-mean" else config.max_update_norm  # clipped-mean scales
        self.admission = Admission(self.run, self.specs, self.algorithm.update_kind,
                                   max_update_bytes=config.max_update_bytes, max_update_norm=norm_refusal,
                                   norm_filter=NormFilter(factor=config.norm_clip_factor,
                                                          window=config.norm_clip_window,
                                                          warmup=config.norm_clip_warmup))
        self.runstate = RunState(config, clock)
        self.telemetry = Telemetry()  # counted always (cheap); exported with --metrics-port (server/prometheus.py)
        self.runstate.sinks.append(self.telemetry)
        self.rundir = self.runstate.rundir
        theta = self.runstate.resume(numel=self.layout.numel, version_of=self._version_of, outer=self.outer,
                                     registry=self.registry, rounds=self.state, clusters=self.clusters)
        self.registry.revoked |= read_revoked(config.run_dir)  # revoked after the last checkpoint
        self.stats.load(self.rundir.metrics_path)
        self.steering = Steering(self, config.run_dir)
        self.broadcast = Broadcast(self.layout, self.layout.flatten(params) if theta is None else theta,
                                   encoding=self.run.encoding, chunk_bytes=self.run.chunk_bytes)
        self.runstate.started = clock()
        # --schedule buffered (server/buffered.py): training without rounds; evaluations stay rounds.
        self.buffered = (BufferedRounds(self, resumed=self.runstate.resumed_meta)
                         if self.run.schedule == "buffered" else None)

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
    def best(self) -> Best | None:
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

    def count_bytes(self, *, sent: int = 0, received: int = 0, client: str | None = None) -> None:
        self.runstate.count_bytes(sent=sent, received=received)
        self.stats.count_bytes(client, sent=sent, received=received)

    def holding(self) -> bool:
        """No round may open: stopping, paused by the operator, or stopping after the open round."""
        return self._stopping.is_set() or self.steering.paused or self.steering.stop_requested

    def _version_of(self, theta: torch.Tensor) -> str:
        """The parameter version of a flat θ read from a checkpoint: the digest publishing it would give."""
        if theta.dtype != torch.float32 or theta.dim() != 1 or theta.numel() != self.layout.numel:
            raise ValueError(f"checkpoint in {self.config.run_dir}: θ has {theta.numel()} {theta.dtype} values, "
                             f"the model has {self.layout.numel} float32 ones")
        return version_of(self.layout, theta)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=RoundThread(self).run, name="fedmeta-rounds", daemon=True)
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
            now = self.clock()
            self.registry.join(client_id, device=device, num_tasks=num_tasks, now=now, busy=self.busy)
            if now - self._join_notified >= JOIN_NOTIFY_S:
                # for the round thread (it may open a round now); no one's assignment changed. At most
                # every JOIN_NOTIFY_S: each wake re-reads the registry, and 10,000 joins arrive in a burst
                self._join_notified = now
                self._cond.notify_all(polls=())
        self.stats.joined(client_id)
        return self.run

    def leave(self, client_id: str) -> None:
        with self._cond:
            self.registry.leave(client_id)
            if self.buffered is not None:
                self.buffered.leave(client_id)
            rnd = self.state.round
            if rnd is not None and client_id in rnd.sampled and client_id not in rnd.answered:
                rnd.sampled.discard(client_id)
                rnd.dropped.add(client_id)
            log.log(logging.DEBUG if self.finished.is_set() else logging.INFO, "client %s left", client_id,
                    extra=fields(event="client_left", client=client_id))
            self._cond.notify_all(polls=(client_id,))

    def heartbeat(self, client_id: str, round_index: int) -> bool:
        """A computing client is alive: renew its lease. Returns whether its round still wants it."""
        with self._cond:
            self.registry.touch(client_id, self.clock())
            rnd = self.state.round
            if self.buffered is not None and self.buffered.heartbeat(client_id, round_index):
                return True
            return (rnd is not None and rnd.index == round_index and client_id in rnd.sampled
                    and client_id not in rnd.answered)

    def check_run(self, run_id: str) -> None:
        check_run(run_id, self.run.run_id)

    async def wait(self, client_id: str, timeout_s: float) -> Assignment:
        """Long-poll: until this client has work, the run finishes, or timeout_s passes (server/longpoll.py)."""
        return await longpoll.wait(self, client_id, timeout_s)

    def _assignment_for(self, client_id: str) -> Assignment:
        return longpoll.assignment_for(self, client_id)

    def live_clients(self) -> int:
        """Registered clients that called within their lease."""
        with self._cond:
            return len(self.registry.live(self.clock()))

    def uploads_in_use(self) -> int:
        """Upload slots held now (asyncio.Semaphore keeps its free count in _value, as tests read it)."""
        return self.config.max_concurrent_uploads - self._uploads._value  # type: ignore[attr-defined]

    def busy(self) -> set[str]:
        """Clients the run is waiting for: sampled in the open round, or holding a buffered assignment."""
        rnd = self.state.round
        return (set(rnd.sampled) if rnd else set()) | (self.buffered.busy() if self.buffered else set())

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

    def parameter_wire(self, version: str, encoded: EncodedTensorSet) -> Wire:
        """FetchParameters' messages for an acquired version, serialised once (outside the lock)."""
        return self._wire.messages(version, encoded)

    def release_parameters(self) -> None:
        with self._cond:
            self.broadcast.release()

    # ---- admission ----------------------------------------------------------------------------------
    def admit(self, meta: UpdateMeta) -> Ticket:
        """Every check of an update's header, before its payload is read (server/admission.py)."""
        self.check_run(meta.run_id)
        with self._cond:
            self.registry.check_not_revoked(meta.client_id, f"its update for round {meta.round} is")
            self.registry.touch(meta.client_id, self.clock())
            if self.buffered is not None and meta.kind is not None:  # a training update: no rounds
                ticket = self.buffered.admit(meta)
            else:
                ticket = self.admission.admit(meta, self.state.round)
        return self.admission.weigh(ticket)

    def commit(self, ticket: Ticket, tensors: Mapping[str, torch.Tensor] | None) -> bool:
        """Check an admitted update's values and count it once. Returns True if it was a duplicate."""
        if ticket.duplicate:
            return True
        norm = check_values(tensors, self.admission.max_update_norm) if tensors is not None else 0.0  # O(model)
        if self.buffered is not None and ticket.meta.kind is not None:
            return self.buffered.commit(ticket, tensors, norm)  # under the lock
        cid = ticket.meta.client_id
        cluster = check_cluster(tensors, self.run.clusters) if tensors is not None else None
        with self._cond:
            self.registry.check_not_revoked(cid, f"its update for round {ticket.meta.round} is")  # revoked mid-stream
            rnd, duplicate = self.admission.count(ticket, self.state.round, tensors, norm, cluster)
            if rnd is not None:
                self.telemetry.update_accepted("validation" if rnd.validation else
                                               "evaluation" if rnd.evaluation else "train")
            if rnd is not None and (rnd.sampled <= rnd.answered or (cid in rnd.proven and rnd.proven <= rnd.answered)):
                # Only the round thread cares, and only once every sampled client answered (it
                # wakes at the deadline by itself): waking every waiting long-poll on every
                # update cost 256 clients half the coordinator's CPU (benchmarks/load_clients.py).
                self._cond.notify_all(polls=())
        if not duplicate:
            self.stats.trained(cid, ticket.meta.metrics)
        return duplicate

    def assigned_tasks(self, meta: UpdateMeta) -> int:
        """The most an update may weigh: the tasks the coordinator assigned a client for the round."""
        return assigned_tasks(self.run, meta)

    def upload_slot(self) -> asyncio.Semaphore:
        """Bounds how many update payloads are buffered at once (memory: one model each)."""
        return self._uploads

    def download_slot(self) -> asyncio.Semaphore:
        """Bounds how many parameter streams send at once (memory: a few chunks each)."""
        return self._downloads

    # ---- the round thread -------------------------------------------------------------------------
    def _clients_view(self, now: float) -> rounds.Clients:
        return self.registry.view(now)  # type: ignore[return-value]  (duck-types rounds.Clients, lazily)
