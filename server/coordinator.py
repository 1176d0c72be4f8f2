"""The coordinator's state: theta, the client registry and the round state machine.

No gRPC here beyond status codes: the service (server/service.py) turns RPCs into
calls on Coordinator, and Coordinator raises Rejected(code, message) for bad ones.

A round: sample clients -> they fetch theta and submit updates, summed into a
streaming weighted mean as they arrive -> the round thread closes the round when
every sampled client answered, or at the deadline with >= min_clients answers
(else it replaces the silent clients and extends the deadline) -> outer step on a
copy of theta, new version, checkpoint, metrics. After the last training round an
evaluation round collects pre/post-adaptation losses, then the run is FINISHED.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc
import torch

from common.aggregation import Aggregator, FlatLayout, NormFilter, make_aggregator, update_norm
from common.algorithms import OuterConfig, UpdateKind, get_algorithm, meta_parameters
from common.algorithms.outer import guarded_step
from common.codec import EncodedTensorSet, TensorSetHeader, TensorSpec, check_specs, encode
from common.config import RunConfig
from common.metrics import allowed_metrics, check_metrics
from common.textsafe import RateLimit, clip
from server import checkpoint, report, validation
from server.validation import Best, due
from server.config import ServerConfig, describe, resume_differences
from server.rundir import RunDir

log = logging.getLogger("fedmeta.coordinator")

# An update weighs at most the tasks the coordinator assigned (--tasks-per-client, or
# --eval-tasks-per-client in the evaluation); metric names and ranges: common/metrics.py;
# magnitudes: MAX_UPDATE_ABS (common/algorithms/outer.py) and NormFilter (--norm-clip-factor).


def _few(ids: set[str], shown: int = 10) -> str:
    """At most `shown` ids for a log line, and how many more (a log line stays short)."""
    if not ids:
        return "none"
    names = sorted(ids)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


class Rejected(Exception):
    """A request refused with a gRPC status code and a sentence a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


@dataclass
class ClientInfo:
    client_id: str
    device: str
    num_tasks: int
    last_seen: float
    polling: int = 0
    left: bool = False
    told_finished: bool = False
    answered: int = 0  # rounds this client answered: clients that have answered are sampled first
    silent: int = 0  # rounds in a row it was sampled and did not answer
    benched_until: int = -1  # not sampled before this round (after --max-silent-rounds silent ones)
    benchings: int = 0

    def record(self) -> dict[str, Any]:
        return {"device": self.device, "num_tasks": self.num_tasks, "answered": self.answered,
                "silent": self.silent, "benched_until": self.benched_until, "benchings": self.benchings}


@dataclass
class Round:
    index: int
    evaluation: bool
    sampled: set[str]
    started: float
    deadline: float
    version: str
    accumulator: Aggregator | None
    answered: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weight: float = 0.0
    metric_weights: dict[str, float] = field(default_factory=dict)  # per name: the weight of who sent it
    norms: dict[str, float] = field(default_factory=dict)  # per client: its update's L2 norm as sent
    attempts: int = 0
    proven: set[str] = field(default_factory=set)  # sampled clients that had answered a round before
    proven_done: float | None = None  # when the last of them answered
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation rounds only
    validation: bool = False  # an evaluation round on validation tasks during training (--eval-every)


@dataclass(frozen=True)
class UpdateMeta:
    """The header of a submitted update, as domain values."""

    run_id: str
    round: int
    client_id: str
    base_version: str
    kind: UpdateKind | None  # None: evaluation metrics
    weight: float
    metrics: Mapping[str, float]
    tensors: TensorSetHeader | None
    validation: bool = False


class Coordinator:
    """Holds theta and runs rounds; thread-safe; one instance per run."""

    def __init__(self, config: ServerConfig, *, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.run: RunConfig = config.run
        self.algorithm = get_algorithm(self.run.algorithm)
        self.rundir = RunDir(config.run_dir)
        self._on_round = on_round
        self._cond = threading.Condition()
        self._uploads = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self._clients: dict[str, ClientInfo] = {}
        # (round, validation) -> clients counted: a validation before round r is not round r.
        self._accepted: dict[tuple[int, bool], set[str]] = {}
        self._round: Round | None = None
        self._waiting_since = time.monotonic()
        self._stopping = threading.Event()
        self.finished = threading.Event()
        self.failed = threading.Event()  # the round thread stopped on an error: not a finished run
        self._purged_at = 0.0
        # Exploration: a round offers seats to clients that never answered only from round
        # _explore_at on; each round whose newcomers all stayed silent doubles the gap (to 64).
        self._explore_at = 0
        self._explore_misses = 0
        self._thread: threading.Thread | None = None
        self._bytes_lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None

        params = meta_parameters(self.run, self.run.seed)
        self.layout = FlatLayout.of(params)
        self.specs: tuple[TensorSpec, ...] = self.layout.specs
        self.outer = self.algorithm.make_outer(OuterConfig(lr=config.outer_lr, rounds=config.rounds,
                                                                 cosine=self.run.cosine_outer))
        self.next_round = 0
        self.evaluation_done = False
        self._wall_before = 0.0
        self._readers = 0
        self._stepping = False
        self.clients_seen = 0  # registrations: distinct ids, unless one was forgotten and came back
        self._validated_through = 0  # rounds trained when θ was last validated
        self.best: Best | None = None
        self._norm_filter = NormFilter(factor=config.norm_clip_factor, window=config.norm_clip_window,
                                       warmup=config.norm_clip_warmup)
        self._clip_log = RateLimit(burst=3, window_s=60.0)
        self._theta = self.layout.flatten(params)
        self._resume()
        self._publish(self._theta)
        self._started = time.monotonic()

    # ---- state persistence -------------------------------------------------------------
    def _resume(self) -> None:
        self.rundir.check_not_finished()
        state = checkpoint.load(self.rundir.checkpoint_dir, version_of=self._version_of)
        if state is None:
            self.rundir.create(describe(self.config))
            return
        stored = state.meta.get("config", {})
        current = describe(self.config)
        model = stored.get("model")
        if isinstance(model, dict) and model.get("name") == "conv4" and "norm" not in (model.get("kwargs") or {}):
            # Conv4 before --norm: transductive batch norm. Resuming needs --norm batch.
            stored["model"] = {**model, "kwargs": {**(model.get("kwargs") or {}), "norm": "batch"}}
        differ = resume_differences(stored, current)  # the settings declared resume=True
        if differ:
            pairs = ", ".join(differ)
            raise ValueError(f"--run-dir {self.config.run_dir} holds a run with other settings ({pairs}); "
                             "pass the same settings to resume or choose a new --run-dir")
        if state.theta.numel() != self.layout.numel:
            raise ValueError(f"checkpoint in {self.config.run_dir} does not match the model's size")
        self._theta = state.theta.clone()
        self.outer.load_state_dict(state.outer)
        meta = state.meta
        self.next_round = int(meta["next_round"])
        self.bytes_sent = int(meta.get("bytes_sent", 0))
        self.bytes_received = int(meta.get("bytes_received", 0))
        self._wall_before = float(meta.get("wall_s", 0.0))
        self._validated_through = int(meta.get("validated_through", 0))
        self.best = Best.from_json(meta.get("best"))
        seen = meta.get("clients_seen", 0)
        self.clients_seen = len(seen) if isinstance(seen, list) else int(seen)  # a list in older checkpoints
        now = time.monotonic()
        for cid, info in list(meta.get("clients", {}).items())[: self.config.max_clients]:
            self._clients[cid] = ClientInfo(
                cid, str(info.get("device", ""))[:64], int(info.get("num_tasks", 0)), now,
                answered=int(info.get("answered", 0)), silent=int(info.get("silent", 0)),
                benched_until=int(info.get("benched_until", -1)), benchings=int(info.get("benchings", 0)))
        dropped = self.rundir.trim_metrics(self.next_round)
        if dropped:
            log.warning("dropped %d records of rounds after the checkpoint from metrics.jsonl: those rounds are "
                        "trained again", dropped)
        log.info("resumed run %s from its checkpoint: next round %d of %d, %d clients known",
                 self.run.run_id, self.next_round, self.config.rounds, len(self._clients))

    def _save_checkpoint(self) -> None:
        with self._cond:
            # Bounded by --max-clients: the registry, not every id ever seen.
            clients = {c.client_id: c.record() for c in self._clients.values() if not c.left}
            seen = self.clients_seen
        meta = {
            "next_round": self.next_round,
            "version": self.version,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wall_s": self.wall_s,
            "clients": clients,
            "clients_seen": seen,
            "validated_through": self._validated_through,
            "best": None if self.best is None else self.best.to_json(),
            "config": describe(self.config),
            # Sampling is a pure function of (seed, round, attempt): no generator state to save.
            "rng": {"seed": self.run.seed, "round": self.next_round},
        }
        checkpoint.save(self.rundir.checkpoint_dir, checkpoint.Checkpoint(self._theta, self.outer.state_dict(), meta),
                        keep=self.config.keep_checkpoints)

    def _version_of(self, theta: torch.Tensor) -> str:
        """The parameter version of a flat θ read from a checkpoint: the digest _publish would give it."""
        if theta.dtype != torch.float32 or theta.dim() != 1 or theta.numel() != self.layout.numel:
            raise ValueError(f"checkpoint in {self.config.run_dir}: θ has {theta.numel()} {theta.dtype} values, "
                             f"the model has {self.layout.numel} float32 ones")
        return encode(self.layout.views(theta)).header.sha256.hex()

    @property
    def wall_s(self) -> float:
        return self._wall_before + time.monotonic() - self._started

    def _publish(self, theta: torch.Tensor) -> None:
        """Make theta the broadcast version; the payload views theta's memory (no copy for float32)."""
        self._theta = theta
        views = self.layout.views(theta)
        self._encoded: dict[str, EncodedTensorSet] = {}
        plain = encode(views)
        self.version = plain.header.sha256.hex()
        self._encoded["float32"] = plain
        if self.run.encoding != "float32":
            self._encoded[self.run.encoding] = encode(views, encoding=self.run.encoding)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The current meta-parameters as named views (read-only by convention)."""
        return self.layout.views(self._theta)

    # ---- lifecycle -----------------------------------------------------------------------
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

    def _unavailable(self) -> Rejected:
        if self.failed.is_set():
            return Rejected(grpc.StatusCode.UNAVAILABLE,
                            f"the coordinator stopped on an error ({self.error}); retry: a restarted coordinator "
                            "resumes the run from its last checkpoint")
        return Rejected(grpc.StatusCode.UNAVAILABLE,
                        "the coordinator is shutting down; retry: a restarted coordinator resumes the run from its "
                        "last checkpoint")

    def count_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        with self._bytes_lock:
            self.bytes_sent += sent
            self.bytes_received += received

    # ---- RPC entry points ------------------------------------------------------------------
    def join(self, client_id: str, *, device: str, num_tasks: int) -> RunConfig:
        with self._cond:
            if self._stopping.is_set() and not self.finished.is_set():
                raise self._unavailable()
            info = self._clients.get(client_id)
            now = time.monotonic()
            if info is None and len(self._clients) >= self.config.max_clients:
                self._purge(now, left_too=True)
                if len(self._clients) >= self.config.max_clients:
                    raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the coordinator has {len(self._clients)} registered clients, its limit "
                                   "(--max-clients); retry later")
            if info is None or info.left:
                fresh = ClientInfo(client_id, device, num_tasks, now)
                if info is not None:  # rejoining keeps its record: leaving does not wipe silent rounds
                    fresh.answered, fresh.silent = info.answered, info.silent
                    fresh.benched_until, fresh.benchings = info.benched_until, info.benchings
                else:
                    self.clients_seen += 1
                self._clients[client_id] = fresh
                log.info("client %s joined (device %s)", client_id, device or "?")
            else:
                info.device, info.num_tasks, info.last_seen = device, num_tasks, now
            self._cond.notify_all()
        return self.run

    def _purge(self, now: float, *, left_too: bool = False) -> None:
        """Forget clients silent for --forget-client-s (and, when the registry is full, every one
        that left); a forgotten client that comes back joins again (NOT_FOUND tells it to)."""
        rnd = self._round
        busy = rnd.sampled if rnd is not None else set()
        old = [cid for cid, c in self._clients.items()
               if c.polling == 0 and cid not in busy
               and (now - c.last_seen > self.config.forget_client_s or (left_too and c.left))]
        for cid in old:
            del self._clients[cid]
        if old:
            log.info("forgot %d clients that left or were silent for over %g s (--forget-client-s)",
                     len(old), self.config.forget_client_s)

    def leave(self, client_id: str) -> None:
        with self._cond:
            info = self._known(client_id)
            info.left = True
            rnd = self._round
            if rnd is not None and client_id in rnd.sampled and client_id not in rnd.answered:
                rnd.sampled.discard(client_id)
                rnd.dropped.add(client_id)
            log.log(logging.DEBUG if self.finished.is_set() else logging.INFO, "client %s left", client_id)
            self._cond.notify_all()

    def heartbeat(self, client_id: str, round_index: int) -> bool:
        """A computing client is alive: renew its lease. Returns whether its round still wants it."""
        with self._cond:
            self._known(client_id).last_seen = time.monotonic()
            rnd = self._round
            return (rnd is not None and rnd.index == round_index and client_id in rnd.sampled
                    and client_id not in rnd.answered)

    def _known(self, client_id: str) -> ClientInfo:
        info = self._clients.get(client_id)
        if info is None or info.left:
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"client {client_id!r} has not joined run {self.run.run_id!r}; call Join first")
        return info

    def check_run(self, run_id: str) -> None:
        if run_id != self.run.run_id:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"run {clip(run_id, 80)!r} is not this coordinator's run {self.run.run_id!r}; "
                           "call Join again")

    def wait(self, client_id: str, timeout_s: float, is_active: Callable[[], bool] = lambda: True) -> Assignment:
        """Long-poll: block until this client has work, the run finishes, or timeout_s passes.

        is_active reports whether the caller is still connected; a dead caller stops
        counting as a live client within a second.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            info = self._known(client_id)
            if info.polling > 0:
                deadline = 0.0  # one long-poll per client id: a second one is answered at once
            info.polling += 1
            try:
                while True:
                    if self._stopping.is_set() and not self.finished.is_set():
                        raise self._unavailable()
                    info.last_seen = time.monotonic()
                    assignment = self._assignment_for(client_id)
                    remaining = deadline - time.monotonic()
                    if assignment.action != Action.WAIT or remaining <= 0 or not is_active():
                        if assignment.action == Action.FINISHED:
                            info.told_finished = True
                        return assignment
                    self._cond.wait(timeout=min(remaining, 1.0))
                    if info.left:
                        raise Rejected(grpc.StatusCode.NOT_FOUND, f"client {client_id!r} left the run")
            finally:
                info.polling -= 1
                info.last_seen = time.monotonic()

    def _assignment_for(self, client_id: str) -> Assignment:
        if self.finished.is_set():
            return Assignment(Action.FINISHED, detail="the run is finished")
        rnd = self._round
        if rnd is None:
            return Assignment(Action.WAIT, detail="waiting for clients to start the next round")
        if client_id in rnd.sampled and client_id not in rnd.answered:
            action = Action.EVALUATE if rnd.evaluation else Action.TRAIN
            return Assignment(action, rnd.index, rnd.version, validation=rnd.validation)
        return Assignment(Action.WAIT, detail=f"round {rnd.index} is in progress without you")

    def inline_parameters(self, version: str) -> tuple[TensorSetHeader, bytes] | None:
        """A copy of version's encoded parameters if they fit in one chunk (to inline them), else None."""
        with self._cond:
            encoded = self._encoded[self.run.encoding]
            if version != self.version or self._stepping or encoded.header.total_bytes > self.run.chunk_bytes:
                return None
            return encoded.header, bytes(encoded.payload)

    def acquire_parameters(self, client_id: str, version: str) -> EncodedTensorSet:
        """The encoded current parameters, held for a stream until release_parameters().

        While any stream holds them, the outer step works on a copy instead of in place.
        """
        with self._cond:
            self._known(client_id).last_seen = time.monotonic()
            if version != self.version or self._stepping:
                raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                               f"parameter version {version[:12]!r} is not current (the current one is "
                               f"{self.version[:12]!r}, or a new one is being made): ask WaitForAssignment "
                               "for new work")
            self._readers += 1
            return self._encoded[self.run.encoding]

    def release_parameters(self) -> None:
        with self._cond:
            self._readers -= 1

    def check_update(self, meta: UpdateMeta) -> bool:
        """Validate an update header before its payload is read. Returns True for a duplicate."""
        self.check_run(meta.run_id)
        with self._cond:
            self._known(meta.client_id).last_seen = time.monotonic()
            if meta.client_id in self._accepted.get((meta.round, meta.validation), ()):
                return True
            rnd = self._round
            self._check_round(rnd, meta)
        evaluation, validation = meta.kind is None, meta.validation
        assigned = self.assigned_tasks(meta)
        if not (0 < meta.weight <= assigned):
            flag = ("--val-tasks-per-client" if validation else "--eval-tasks-per-client" if evaluation
                    else "--tasks-per-client")
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"weight: expected a number of tasks in (0, {assigned}] (the {assigned} tasks this "
                           f"coordinator assigned, {flag}), got {meta.weight!r}")
        allowed = allowed_metrics(self.run, evaluation=evaluation, validation=validation)
        if len(meta.metrics) > len(allowed):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"metrics: expected at most {len(allowed)} entries, got {len(meta.metrics)}")
        try:
            check_metrics(self.run, meta.metrics, evaluation=evaluation, validation=validation)
        except ValueError as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if meta.kind is None:
            if meta.tensors is not None and meta.tensors.specs:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "an evaluation update carries no tensors")
            return False
        if meta.tensors is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the update header lists no tensors")
        if meta.tensors.total_bytes > self.config.max_update_bytes:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"update of {meta.tensors.total_bytes} bytes is over the cap of "
                           f"{self.config.max_update_bytes} bytes (--max-update-bytes)")
        try:
            check_specs(meta.tensors.specs, self.specs)
        except ValueError as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return False

    def assigned_tasks(self, meta: UpdateMeta) -> int:
        """The most an update may weigh: the tasks the coordinator assigned a client for the round."""
        if meta.kind is not None:
            return self.run.tasks_per_client
        return self.run.val_tasks_per_client if meta.validation else self.run.eval_tasks_per_client

    def _check_round(self, rnd: Round | None, meta: UpdateMeta) -> None:
        if rnd is None or meta.round != rnd.index:
            current = "none is open" if rnd is None else f"the current round is {rnd.index}"
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"update for round {meta.round} refused: {current}")
        if meta.client_id not in rnd.sampled:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"client {meta.client_id!r} is not sampled in round {rnd.index}")
        if meta.base_version != rnd.version:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"update computed from version {meta.base_version[:12]!r}; round {rnd.index} "
                           f"trains version {rnd.version[:12]!r}")
        if meta.validation != rnd.validation:
            what = "the validation after" if rnd.validation else "round"
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"update {'for' if meta.validation else 'not for'} a validation refused: {what} "
                           f"{rnd.index if not rnd.validation else rnd.index - 1} is open")
        expected = None if rnd.evaluation else self.algorithm.update_kind
        if meta.kind != expected:
            want = "evaluation metrics" if expected is None else expected.value
            got = "evaluation metrics" if meta.kind is None else meta.kind.value
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"round {rnd.index} expects {want}, got {got}")

    def upload_slot(self) -> threading.BoundedSemaphore:
        """Bounds how many update payloads are buffered at once (memory: one model each)."""
        return self._uploads

    def accept(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor] | None) -> bool:
        """Count a verified update once. Returns True if it was a duplicate.

        Its weight is min(claimed, assigned) tasks (check_update refused larger claims); its
        tensors are scaled down if NormFilter finds their norm an outlier.
        """
        weight = min(meta.weight, float(self.assigned_tasks(meta)))
        norm = update_norm(tensors) if tensors is not None else 0.0  # O(model): outside the lock
        with self._cond:
            if meta.client_id in self._accepted.get((meta.round, meta.validation), ()):
                return True
            rnd = self._round
            self._check_round(rnd, meta)
            assert rnd is not None
            if tensors is not None:
                assert rnd.accumulator is not None
                limit, recent = self._norm_filter.limit(), len(self._norm_filter.recent)
                scale = self._norm_filter.scale(norm)
                if scale < 1.0:
                    assert limit is not None
                    if self._clip_log.allow(meta.client_id)[0]:
                        log.warning("round %d: the update from %s has L2 norm %.3g, over %g x the median of the "
                                    "last %d accepted (%.3g); scaled down to it (--norm-clip-factor)", rnd.index,
                                    meta.client_id, norm, self._norm_filter.factor, recent,
                                    limit / self._norm_filter.factor)
                    tensors = {k: v * scale for k, v in tensors.items()}
                rnd.norms[meta.client_id] = norm
                rnd.accumulator.add(tensors, weight)
            for name, value in meta.metrics.items():
                rnd.metric_sums[name] = rnd.metric_sums.get(name, 0.0) + weight * value
                rnd.metric_weights[name] = rnd.metric_weights.get(name, 0.0) + weight
            rnd.metric_weight += weight
            if rnd.evaluation:
                rnd.client_metrics[meta.client_id] = {**meta.metrics, "tasks": weight}
            rnd.answered.add(meta.client_id)
            self._accepted.setdefault((meta.round, meta.validation), set()).add(meta.client_id)
            if not rnd.sampled - rnd.answered or (meta.client_id in rnd.proven and rnd.proven <= rnd.answered):
                # Only the round thread cares, and only once every sampled client answered (it
                # wakes at the deadline by itself): waking every waiting long-poll on every
                # update cost 256 clients half the coordinator's CPU (benchmarks/load_clients.py).
                self._cond.notify_all()
        return False

    # ---- the round thread ------------------------------------------------------------------------
    def _live(self, now: float) -> list[str]:
        lease = 2 * self.run.poll_timeout_s + 5.0
        return sorted(c.client_id for c in self._clients.values()
                      if not c.left and (c.polling > 0 or now - c.last_seen <= lease))

    def _round_loop(self) -> None:
        try:
            while not self._stopping.is_set() and not self.finished.is_set():
                closing = None
                with self._cond:
                    now = time.monotonic()
                    if now - self._purged_at > min(5.0, self.config.forget_client_s / 2):
                        self._purged_at = now
                        self._purge(now)
                    if self._round is None:
                        self._try_open(now)
                    rnd = self._round
                    wake = None if rnd is None else rnd.deadline
                    if rnd is not None:
                        complete = bool(not rnd.sampled - rnd.answered and rnd.answered)
                        early = self._early_close(rnd, now)
                        if early is not None and not complete:
                            complete = now >= early
                            wake = min(early, rnd.deadline)
                        if complete or (now >= rnd.deadline and len(rnd.answered) >= self._quorum(rnd)):
                            closing, self._round = rnd, None
                            self._tally(closing)
                        elif now >= rnd.deadline:
                            self._resample(rnd, now)
                    if closing is None:
                        wait = 0.5 if wake is None else max(0.0, wake - now)
                        self._cond.wait(timeout=min(wait, 0.5))
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

    def _quorum(self, rnd: Round) -> int:
        return 1 if rnd.evaluation else self.config.min_clients

    def _early_close(self, rnd: Round, now: float) -> float | None:
        """When the round may close before its deadline although some sampled clients are silent.

        Clients that have never answered a round are not waited for once every sampled client
        that has answered before did (and the quorum is met), beyond a grace of half the time
        those took: a fake id that joins and never trains costs a round at most 1.5x its pace,
        while a first-time client up to 1.5x slower than the proven ones is still counted."""
        if not rnd.proven or not rnd.proven <= rnd.answered or len(rnd.answered) < self._quorum(rnd):
            return None
        if rnd.proven_done is None:
            rnd.proven_done = now
        return rnd.proven_done + 0.5 * (rnd.proven_done - rnd.started)

    def _tally(self, rnd: Round) -> None:
        """Per client: answered rounds, and silent rounds in a row; --max-silent-rounds of them
        bench a client for max_silent_rounds * 2**benchings rounds (it is not sampled)."""
        limit = self.config.max_silent_rounds
        newcomers = rnd.sampled - rnd.proven
        if newcomers and not rnd.evaluation:
            self._explore_misses = 0 if newcomers & rnd.answered else self._explore_misses + 1
            self._explore_at = rnd.index + 2 ** min(self._explore_misses, 6)
        for cid in rnd.answered:
            info = self._clients.get(cid)
            if info is not None:
                info.answered += 1
                info.silent = 0
        for cid in (rnd.sampled | rnd.dropped) - rnd.answered:
            info = self._clients.get(cid)
            if info is None or info.left:
                continue
            info.silent += 1
            if info.silent >= limit:
                info.benched_until = rnd.index + 1 + limit * 2 ** min(info.benchings, 16)
                info.benchings += 1
                info.silent = 0
                log.info("client %s was sampled and silent in %d rounds in a row: not sampled before round %d "
                         "(--max-silent-rounds)", cid, limit, info.benched_until)

    def _candidates(self, live: list[str], round_index: int) -> list[str]:
        return [c for c in live if self._clients[c].benched_until <= round_index]

    def _pick(self, candidates: list[str], n: int, rng: random.Random, *, explore: bool = True) -> list[str]:
        """n of candidates (sorted): clients that have answered a round before first; newcomers fill
        the seats left, and with explore one seat is kept for a newcomer when n >= 2. Without
        explore, newcomers are picked only if no client has answered yet."""
        proven = [c for c in candidates if self._clients[c].answered > 0]
        fresh = [c for c in candidates if self._clients[c].answered == 0]
        if not proven:
            return rng.sample(fresh, min(n, len(fresh)))
        if not explore:
            return rng.sample(proven, min(n, len(proven)))
        explore_seats = 1 if n >= 2 and fresh else 0
        chosen = rng.sample(proven, min(len(proven), n - explore_seats))
        return chosen + rng.sample(fresh, min(len(fresh), n - len(chosen)))

    def _try_open(self, now: float) -> None:
        if self.evaluation_done or self._stopping.is_set():
            return
        live = self._live(now)
        validation = self._validated_through != self.next_round and due(self.run, self.next_round, self.config.rounds)
        evaluation = validation or self.next_round >= self.config.rounds
        target = self.config.clients_per_round
        waited = now - self._waiting_since
        candidates = self._candidates(live, self.next_round)
        if len(candidates) < self.config.min_clients and waited >= self.config.round_deadline_s:
            candidates = live  # too few unbenched clients: give benched ones another chance
        enough = len(candidates) >= target or (len(candidates) >= self.config.min_clients
                                               and waited >= self.config.round_deadline_s)
        if not enough:
            return
        if validation:  # cheap: the round's usual number of clients, val_tasks_per_client tasks each
            rng = random.Random(f"{self.run.seed}:{self.next_round}:validation")
            sampled = set(self._pick(candidates, target, rng, explore=False))
            accumulator = None
        elif evaluation:
            sampled = set(candidates)
            accumulator = None
        else:
            rng = random.Random(f"{self.run.seed}:{self.next_round}:0")
            sampled = set(self._pick(candidates, target, rng, explore=self.next_round >= self._explore_at))
            accumulator = make_aggregator(self.config.aggregator, self.layout,
                                          max_norm=self.config.max_update_norm, trim=self.config.trim_fraction)
        self._round = Round(self.next_round, evaluation, sampled, now, now + self.config.round_deadline_s,
                            self.version, accumulator, validation=validation)
        self._round.proven = {c for c in sampled if self._clients[c].answered > 0}
        if len(sampled) < target and len(candidates) < target and not evaluation:
            log.info("round %d starts with %d of %d clients (only %d live after %.0f s)",
                     self.next_round, len(sampled), target, len(candidates), waited)
        self._cond.notify_all()

    def _resample(self, rnd: Round, now: float) -> None:
        """Too few answers at the deadline: drop silent clients whose lease expired (slow but
        live ones may still answer), add live clients not yet sampled, extend the deadline.

        Each deadline missed widens the search: attempt k adds up to clients_per_round * 4**(k-1)
        clients, so silent ids that keep their lease (join, heartbeat, never train) delay a round
        by O(log(ids)) deadlines, not by one deadline per id."""
        all_live = self._live(now)
        live = set(all_live)
        silent = rnd.sampled - rnd.answered
        gone = silent - live
        rnd.attempts += 1
        candidates = self._candidates(sorted(live - rnd.sampled), rnd.index)
        rng = random.Random(f"{self.run.seed}:{rnd.index}:{rnd.attempts}")
        target = self.config.clients_per_round
        need = max(target - len(rnd.sampled - gone), target * 4 ** min(rnd.attempts - 1, 8))
        fresh = set(self._pick(candidates, min(need, len(candidates)), rng))
        rnd.sampled = (rnd.sampled - gone) | fresh
        rnd.proven = (rnd.proven - gone) | {c for c in fresh if self._clients[c].answered > 0}
        rnd.dropped |= gone
        rnd.dropped -= rnd.sampled
        rnd.deadline = now + self.config.round_deadline_s
        log.warning("round %d: deadline passed with %d of %d answers (quorum %d); dropped unreachable %s, "
                    "added %s, waiting %g s more", rnd.index, len(rnd.answered), len(silent | rnd.answered),
                    self._quorum(rnd), _few(gone), _few(fresh), self.config.round_deadline_s)
        self._cond.notify_all()

    def _close(self, rnd: Round) -> None:
        # Each metric is averaged over the clients that sent it: one that leaves one out cannot pull it to 0.
        metrics = {k: v / rnd.metric_weights[k] for k, v in rnd.metric_sums.items() if rnd.metric_weights.get(k)}
        if rnd.validation:
            self._validated(rnd, metrics)
            return
        if rnd.evaluation:
            self._finish(rnd, metrics)
            return
        assert rnd.accumulator is not None
        with self._cond:
            self._stepping = True  # no new reader of the old version from here on
            in_place = self._readers == 0
        # Step in place unless a straggler is still streaming the old buffer: O(model) memory.
        theta = self._theta if in_place else self._theta.clone()
        lr = guarded_step(self.outer, theta, rnd.accumulator.take_mean(), rnd.index)
        rnd.accumulator = None
        if lr is None:
            self._log_undone(rnd)
        with self._cond:
            self._publish(theta)
            self._stepping = False
            self.next_round = rnd.index + 1
            self._waiting_since = time.monotonic()
            self._accepted = {k: s for k, s in self._accepted.items() if k[0] >= rnd.index - 8}
            round_s = time.monotonic() - rnd.started
            # Clients start the next round while this thread writes the checkpoint: only this
            # thread changes theta and the optimizer state, so what it writes is consistent.
            self._try_open(time.monotonic())
        if self.next_round % self.config.checkpoint_every == 0 or self.next_round == self.config.rounds:
            self._save_checkpoint()
        record = {
            "round": rnd.index,
            "seed": self.run.seed,
            "meta_loss": metrics.get("loss_post"),
            "loss_pre": metrics.get("loss_pre"),
            "clients_sampled": len(rnd.answered | rnd.sampled | rnd.dropped),
            "clients_answered": len(rnd.answered),
            "round_s": round_s,
            "client_compute_s": metrics.get("compute_s"),
            "outer_lr": lr,
            "step_undone": lr is None,
            "version": self.version,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wall_s": self.wall_s,
        }
        self.rundir.append_metrics(record)
        if self._on_round is not None:
            self._on_round(record)

    def _validated(self, rnd: Round, metrics: dict[str, float]) -> None:
        """A validation closed: record it, export θ to model-best/ if it is the best so far."""
        key, _ = validation.metric(self.run)
        value = metrics.get(key, float("nan"))
        improved = validation.better(self.run, value, self.best)
        if improved:
            self.rundir.export_model(self.parameters(), self.run, self.version, best=True)
            self.best = Best(rnd.index, value)
        entry = validation.record(self.run, rnd.index, metrics, rnd.metric_weight, best=improved,
                                  wall_s=self.wall_s, version=self.version)
        with self._cond:
            self._validated_through = rnd.index
            self._waiting_since = time.monotonic()
            self._try_open(time.monotonic())
        self._save_checkpoint()  # the best so far survives a restart
        self.rundir.append_metrics(entry)
        if self._on_round is not None:
            self._on_round(entry)

    def _log_undone(self, rnd: Round) -> None:
        """An outer step left theta or the optimiser state non-finite and was undone: name the suspects."""
        ranked = sorted(rnd.norms.items(), key=lambda kv: (math.isfinite(kv[1]), -kv[1]))[:5]
        suspects = ", ".join(f"{cid} (norm {norm:.3g})" for cid, norm in ranked) or "none"
        log.error("round %d: the outer step made theta or the optimiser state non-finite; undone (theta, its "
                  "version and the optimiser state are as before the round). Largest updates of the round's %d: "
                  "%s. If no update stands out, lower --outer-lr", rnd.index, len(rnd.norms), suspects)

    def _finish(self, rnd: Round, metrics: dict[str, float]) -> None:
        export = self.rundir.export_model(self.parameters(), self.run, self.version)
        self.summary = {
            "run_id": self.run.run_id,
            "algorithm": self.run.algorithm,
            "task": self.run.task,
            "seed": self.run.seed,
            "rounds_completed": self.next_round,
            "clients_seen": self.clients_seen,
            "wall_s": self.wall_s,
            "eval_s": time.monotonic() - rnd.started,  # the evaluation round, from its opening to its last answer
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "parameter_version": self.version,
            "model": str(export),
            "mode": "federated",
            "eval": report.eval_summary(self.run, metrics, rnd.metric_weight, rnd.client_metrics),
            "config": describe(self.config),
        }
        if self.best is not None:
            key, _ = validation.metric(self.run)
            self.summary["best"] = {"rounds_trained": self.best.rounds_trained, "round": self.best.rounds_trained - 1,
                                    "metric": key.removesuffix("_post"), "value": self.best.value,
                                    "model": str(self.rundir.best_dir / "model.safetensors")}
        self.rundir.write_summary(self.summary)
        with self._cond:
            self.evaluation_done = True
            self.finished.set()
            self._cond.notify_all()
        log.info("run finished: %d rounds, evaluation on %d held-out tasks", self.next_round,
                 self.summary["eval"]["tasks"])

    def clients_pending_finish(self) -> int:
        """Live clients that have not yet been told the run is finished."""
        with self._cond:
            now = time.monotonic()
            return sum(1 for cid in self._live(now) if not self._clients[cid].told_finished)

