"""The client worker: join, long-poll, fetch, compute, submit; reconnects by itself.

The loop is the same in every deployment: a local child of `fedmeta-server
--local-clients`, a container, or a machine across the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

# ClientConfig and its helpers lived here; importers keep `from client.worker import ClientConfig`.
from fedmeta.client.config import KEEPALIVE_PING_S, ClientConfig, channel_options, default_data_seed  # noqa: F401
from fedmeta.client.retry import retryable
from fedmeta.client.session import Next, Session, after_refusal
from fedmeta.common.algorithms import InnerConfig, UpdateKind, get_algorithm, meta_parameters
from fedmeta.common import clusters
from fedmeta.common.codec import ENCODINGS, EncodedTensorSet, TensorSetError, abs_max, encode, specs_of
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import eval_steps, evaluate_holder, validate_holder
from fedmeta.common.logformat import fields
from fedmeta.common.models import build_model, prefers_vmap
from fedmeta.common.proto import pb
from fedmeta.common.tasks import STREAM_TRAIN, TaskBatch, default_shard, is_classification, loss_for, make_tasks, task_seed
from fedmeta.common.transfer import receive_inline

log = logging.getLogger("fedmeta.client")
_KIND = {UpdateKind.META_GRADIENT: pb.UPDATE_KIND_META_GRADIENT, UpdateKind.PARAMETER_DELTA: pb.UPDATE_KIND_PARAMETER_DELTA}


def _test_pause() -> None:
    """Test-only: FEDMETA_TEST_COMPUTE_PAUSE_S=SECONDS makes every client step that much slower
    (tests/integration/test_failures.py uses it for a slow-but-alive client). Never set it in a run."""
    pause = os.environ.get("FEDMETA_TEST_COMPUTE_PAUSE_S")
    if pause:
        time.sleep(float(pause))


def _test_eval_pause() -> None:
    """Test-only: FEDMETA_TEST_EVAL_PAUSE_S=SECONDS makes the final evaluation that much slower
    (tests/integration/test_shutdown.py stops a coordinator during it). Never set it in a run."""
    pause = os.environ.get("FEDMETA_TEST_EVAL_PAUSE_S")
    if pause:
        time.sleep(float(pause))


class ClientError(RuntimeError):
    """A condition this client cannot recover from; the message says what to do."""


class Shutdown(Exception):
    """Raised in the main thread by SIGTERM/SIGINT to stop the worker cleanly."""


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True)
class WorkerHooks:
    """What a host of many clients in one process (client/virtual.py) adds to each worker; the
    defaults change nothing. compute_slot is held around each client step and evaluation (a bound
    on how many compute at once); on_submit runs before an update is sent, on_answer after the
    coordinator's reply (None: it refused the update with a status) - an exactly-once ledger of what
    this client saw accepted."""

    compute_slot: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    on_submit: Callable[[pb.UpdateHeader], None] = _ignore
    on_answer: Callable[[pb.UpdateHeader, pb.SubmitUpdateResponse | None], None] = _ignore


@dataclass(frozen=True)
class _Carried:
    """A trained update waiting to ride on the next long-poll (WaitForAssignment.update)."""

    header: pb.UpdateHeader
    encoded: EncodedTensorSet | None
    message: pb.InlineUpdate
    accepted: Callable[[pb.SubmitUpdateResponse], None]  # what the worker does once it is accepted


class Worker:
    """Runs one client until the coordinator says FINISHED (exit 0) or it gives up (exit 1).

    It holds no process-wide state (but --threads): many run side by side on threads of one
    process with their own ids, data seeds and shards (client/virtual.py).
    """

    def __init__(self, config: ClientConfig, hooks: WorkerHooks = WorkerHooks()) -> None:
        self.config = config
        self.hooks = hooks
        self.stop = threading.Event()
        self._rng = random.Random(config.client_id)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to this process")
        token = None
        if config.token_file is not None:
            token = Path(config.token_file).read_text().strip()
            if not token:
                raise ValueError(f"--token-file: {config.token_file} is empty")
        self.session = Session(config.channel(), client_id=config.client_id, token=token, policy=config.retry,
                               stop=self.stop, rng=self._rng)
        self.channel = self.session.channel
        self.run: RunConfig | None = None
        self._cached_version = ""
        self._params: dict[str, torch.Tensor] = {}
        self.rounds_trained = 0
        self._carried: _Carried | None = None

    # ---- RPCs -------------------------------------------------------------------------------
    def join(self) -> RunConfig:
        allowed = self.config.allow_model_imports
        try:
            # Nothing the coordinator sends chooses code here: algorithm, task and model are looked up
            # in fixed tables, and an import-path model only if this client's operator allowed it.
            run = self.session.join(device=str(self.device), encodings=ENCODINGS)
            fresh = self.run is None or self.run.run_id != run.run_id
            if fresh:
                model = build_model(run.model, allowed_imports=allowed)
                specs = specs_of(clusters.stack(meta_parameters(run, 0, allowed_imports=allowed), run.clusters))
        except ValueError as exc:
            raise ClientError(f"refusing the coordinator's run configuration: {exc}") from None
        if fresh:
            self.model = model.to(self.device)
            self.specs = specs
            # The most a parameter stream of this run may hold: float32 at most, whatever the header claims.
            self.max_param_bytes = sum(s.nbytes for s in specs)
            self.algorithm = get_algorithm(run.algorithm)
            self.loss_fn = loss_for(run.task)
            self.vectorize = prefers_vmap(self.model) if self.config.vectorize is None else self.config.vectorize
            shard = self.config.shard if self.config.shard is not None else default_shard(
                self.config.client_id, self.config.data_seed)
            try:
                self.tasks = make_tasks(run, data_seed=self.config.data_seed, shard=shard, data_dir=self.config.data_dir,
                                        family=self.config.task_family)
            except ValueError as exc:
                raise ClientError(str(exc)) from None
            self._cached_version = ""
        self.run = run
        log.info("client %s joined run %s (%s on %s)", self.config.client_id, run.run_id, run.algorithm, run.task,
                 extra=fields(event="joined"))
        return run

    def _hold(self, version: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._params = {k: v.to(self.device) for k, v in params.items()}
        self._cached_version = version
        return self._params

    # A parameter buffer is allocated only for the run's own model: the header must list exactly its
    # tensors (self.specs) and fit in their float32 size (self.max_param_bytes), whatever total it declares.
    def _take_inline(self, a: pb.WaitForAssignmentResponse) -> None:
        """Keep parameters the coordinator inlined in the assignment (small models)."""
        if not a.HasField("parameters"):
            return
        try:
            self._hold(a.parameter_version,
                       receive_inline(a.parameters, max_bytes=self.max_param_bytes, expected=self.specs))
        except TensorSetError as exc:
            log.warning("inlined parameters are unusable (%s); fetching them instead", exc)

    def _fetch(self, version: str) -> dict[str, torch.Tensor]:
        if version == self._cached_version:
            return self._params
        assert self.run is not None
        try:
            return self._hold(version, self.session.fetch(self.run.run_id, version, max_bytes=self.max_param_bytes,
                                                          expected=self.specs))
        except TensorSetError as exc:
            raise ClientError(f"the coordinator's parameters for version {version[:12]} are unusable: {exc}") from None

    def _submit(self, header: pb.UpdateHeader, tensors: dict[str, torch.Tensor] | None, *, carry: bool = False,
                then: Callable[[pb.SubmitUpdateResponse], None] = _ignore) -> pb.SubmitUpdateResponse | None:
        """Send an update, or with `carry` leave it for the next long-poll to take (None: the reply
        to that poll answers it, and `then` gets that answer), where the coordinator takes updates
        that way and it fits in one message: one call a round instead of two."""
        assert self.run is not None
        encoded = None
        if tensors is not None:
            encoded = encode({k: v.detach().cpu() for k, v in tensors.items()}, encoding=self.run.encoding)
        self.hooks.on_submit(header)
        message = self.session.carry(header, encoded) if carry else None
        if message is not None:
            self._carried = _Carried(header, encoded, message, then)
            return None
        return self._send(header, encoded)

    def _send(self, header: pb.UpdateHeader, encoded: EncodedTensorSet | None) -> pb.SubmitUpdateResponse:
        assert self.run is not None
        try:
            reply = self.session.submit(header, encoded, chunk_bytes=self.run.chunk_bytes)
        except grpc.RpcError as exc:
            if not retryable(exc, overload=False):  # the coordinator's answer: the update does not count
                self.hooks.on_answer(header, None)
            raise
        self.hooks.on_answer(header, reply)
        return reply

    def leave(self) -> None:
        if self.run is None:
            return
        try:
            self.session.leave(self.run.run_id, timeout_s=2.0)
        except grpc.RpcError:
            pass

    @contextlib.contextmanager
    def _heartbeats(self, round_index: int) -> Iterator[None]:
        """While the body runs, tell the coordinator every poll_timeout_s / 2 that this client is alive.

        A long client step (Conv4, a big meta-batch, the final evaluation) would otherwise
        outlive the lease the coordinator gives a client after its last call, and a slow
        client would be dropped and replaced like a dead one.
        """
        run = self.run
        assert run is not None
        done = threading.Event()
        interval = max(0.5, run.poll_timeout_s / 2)

        def beat() -> None:
            while not done.wait(interval):
                try:
                    self.session.heartbeat(run.run_id, round_index, timeout_s=interval)
                except grpc.RpcError as exc:  # the next long-poll or submit reports real trouble
                    log.debug("heartbeat failed: %s", exc)

        thread = threading.Thread(target=beat, name="fedmeta-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # ---- work ---------------------------------------------------------------------------------
    def _cluster(self, params: dict[str, torch.Tensor], batch_index: int, *, steps: int,
                 batch: TaskBatch | None = None) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """--clusters: (the cluster whose θ adapts best on this holder's training support sets, every θ)."""
        run = self.run
        assert run is not None
        thetas = clusters.split(params, run.clusters)
        if run.clusters == 1:
            return 0, thetas
        if batch is None:
            batch = self.tasks.sample("train", num_tasks=run.tasks_per_client, shots=run.shots, queries=run.queries,
                                      seed=task_seed(run.seed, self.config.data_seed, STREAM_TRAIN, batch_index))
        j, losses = clusters.choose(self.algorithm, self.model, thetas, batch.to(self.device), self.loss_fn,
                                    steps=steps, lr=run.inner_lr, vectorize=self.vectorize)
        if losses:
            log.debug("cluster %d of %d (support loss after adaptation: %s)", j, run.clusters,
                      ", ".join(f"{v:.4g}" for v in losses))
        return j, thetas

    def warm_up(self) -> None:
        """Join, then one client step on the run's initial θ and a task of this client's own stream,
        sent nowhere: a fresh process pays torch's first-call costs (vmap, kernels) before the
        coordinator times a first answer (it does not wait long for newcomers: server/rounds.py)."""
        run = self.join()
        params = {k: v.to(self.device) for k, v in
                  meta_parameters(run, 0, allowed_imports=self.config.allow_model_imports).items()}
        batch = self.tasks.sample("train", num_tasks=run.tasks_per_client, shots=run.shots, queries=run.queries,
                                  seed=task_seed(run.seed, self.config.data_seed, STREAM_TRAIN, 0))
        inner = InnerConfig.from_run(run, round_index=0, vectorize=self.vectorize)
        j, thetas = self._cluster(params, 0, steps=max(1, run.inner_steps), batch=batch)
        self.algorithm.client_step(self.model, thetas[j], batch.to(self.device), self.loss_fn, inner)

    def train(self, round_index: int, version: str) -> None:
        with self._heartbeats(round_index):
            self._train(round_index, version)

    def _train(self, round_index: int, version: str) -> None:
        run = self.run
        assert run is not None
        params = self._fetch(version)
        seed = task_seed(run.seed, self.config.data_seed, STREAM_TRAIN, round_index)
        with self.hooks.compute_slot():
            batch = self.tasks.sample("train", num_tasks=run.tasks_per_client, shots=run.shots, queries=run.queries, seed=seed)
            start = time.perf_counter()
            _test_pause()
            if self.config.slow_task_s > 0:  # --slow-task-s: a deliberately slow client (benchmarks, tests)
                self.stop.wait(self.config.slow_task_s)
            inner = InnerConfig.from_run(run, round_index=round_index, vectorize=self.vectorize)
            j, thetas = self._cluster(params, round_index, steps=max(1, run.inner_steps), batch=batch)
            update = self.algorithm.client_step(self.model, thetas[j], batch.to(self.device), self.loss_fn, inner)
            if run.clusters > 1:  # this cluster's slice; zeros in the others' (the coordinator checks it)
                update = dataclasses.replace(update, tensors=clusters.embed(update.tensors, j, thetas))
            compute_s = time.perf_counter() - start
        finite = all(math.isfinite(abs_max(t)) for t in update.tensors.values())
        if not finite or not all(math.isfinite(v) for v in update.metrics.values()):
            raise ClientError(f"round {round_index}: the client step produced non-finite values (query loss "
                              f"{update.metrics.get('loss_post')}); the inner loop diverged: lower --inner-lr "
                              "or --outer-lr on the coordinator")
        header = pb.UpdateHeader(
            run_id=run.run_id, round=round_index, client_id=self.config.client_id, base_version=version,
            kind=_KIND[self.algorithm.update_kind], weight=update.weight,
            metrics={**update.metrics, "compute_s": compute_s},
        )
        def accepted(reply: pb.SubmitUpdateResponse) -> None:  # a line per accepted update, as it is answered
            self.rounds_trained += 1
            level = logging.INFO if self.rounds_trained % 100 == 1 else logging.DEBUG
            log.log(level, "round %d: %d tasks, query loss %.3f -> %.3f, %.1f ms compute%s", round_index,
                    batch.num_tasks, update.metrics["loss_pre"], update.metrics["loss_post"], compute_s * 1e3,
                    " (duplicate)" if reply.duplicate else "", extra=fields(event="trained", round=round_index))

        reply = self._submit(header, update.tensors, carry=True, then=accepted)
        if reply is not None:
            accepted(reply)

    def evaluate(self, round_index: int, version: str, *, validation: bool = False) -> None:
        with self._heartbeats(round_index):
            if validation:
                self._validate(round_index, version)
            else:
                self._evaluate(round_index, version)

    def _validate(self, rounds_trained: int, version: str) -> None:
        """A validation during training: θ after `rounds_trained` rounds on this holder's validation tasks."""
        run = self.run
        assert run is not None
        params = self._fetch(version)
        with self.hooks.compute_slot():
            j, thetas = self._cluster(params, rounds_trained, steps=eval_steps(self.algorithm, run))
            params = thetas[j]
            metrics = validate_holder(self.algorithm, self.model, params, self.tasks, run, data_seed=self.config.data_seed,
                                      rounds_trained=rounds_trained, device=self.device, vectorize=self.vectorize)
        header = pb.UpdateHeader(
            run_id=run.run_id, round=rounds_trained, client_id=self.config.client_id, base_version=version,
            kind=pb.UPDATE_KIND_EVALUATION, weight=float(run.val_tasks_per_client), metrics=metrics, validation=True,
        )
        self._submit(header, None)
        what = "accuracy" if is_classification(run.task) else "loss"
        log.info("validation after %d rounds on %d tasks: %s %.3f", rounds_trained, run.val_tasks_per_client, what,
                 metrics[f"{what}_post"], extra=fields(event="validated", round=rounds_trained))

    def _evaluate(self, round_index: int, version: str) -> None:
        run = self.run
        assert run is not None
        params = self._fetch(version)
        log.info("round %d: evaluating on %d held-out tasks", round_index, run.eval_tasks_per_client,
                 extra=fields(event="evaluating", round=round_index))
        _test_eval_pause()
        with self.hooks.compute_slot():
            j, thetas = self._cluster(params, round_index, steps=eval_steps(self.algorithm, run))
            if run.clusters > 1:
                log.info("evaluating cluster %d of %d, the one whose θ adapts best on this holder's support sets", j,
                         run.clusters)
            params = thetas[j]
            metrics = evaluate_holder(self.algorithm, self.model, params, self.tasks, run, data_seed=self.config.data_seed,
                                      device=self.device, vectorize=self.vectorize)
        header = pb.UpdateHeader(
            run_id=run.run_id, round=round_index, client_id=self.config.client_id, base_version=version,
            kind=pb.UPDATE_KIND_EVALUATION, weight=float(run.eval_tasks_per_client), metrics=metrics,
        )
        self._submit(header, None)
        what = "accuracy" if is_classification(run.task) else "loss"
        log.info("evaluation on %d held-out tasks: %s %.3f before, %.3f after %d steps", run.eval_tasks_per_client, what,
                 metrics[f"{what}_pre"], metrics[f"{what}_post"], run.eval_steps,
                 extra=fields(event="evaluated", round=round_index))

    def run_forever(self) -> int:
        """The worker loop. Returns the process exit code."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self.join()
        while not self.stop.is_set():
            run = self.run
            assert run is not None
            try:
                asked = time.monotonic()
                a = self._poll(run)
                if a.action == pb.ACTION_WAIT and time.monotonic() - asked < run.poll_timeout_s / 2:
                    # A long-poll answers WAIT only at its timeout; a quick WAIT means the coordinator
                    # has no long-poll thread to spare (a short poll): pause before asking again.
                    self.stop.wait(self._rng.uniform(0.5, 1.0) * min(2.0, run.poll_timeout_s))
                    continue
                if a.action == pb.ACTION_FINISHED:
                    log.info("the run is finished after %d rounds trained here; leaving", self.rounds_trained,
                             extra=fields(event="finished"))
                    self.leave()
                    return 0
                self._take_inline(a)
                if a.action == pb.ACTION_TRAIN:
                    self.train(a.round, a.parameter_version)
                elif a.action == pb.ACTION_EVALUATE:
                    self.evaluate(a.round, a.parameter_version, validation=a.validation)
            except grpc.RpcError as exc:
                if not isinstance(exc, grpc.Call):
                    raise
                self._on_refusal(exc)
        self._send_carried()
        self.leave()
        return 0

    def _poll(self, run: RunConfig) -> pb.WaitForAssignmentResponse:
        """One long-poll, carrying the update trained last if one waits; its reply answers the update."""
        carried, self._carried = self._carried, None
        try:
            a = self.session.wait(run.run_id, self._cached_version, timeout_s=run.poll_timeout_s + 10.0,
                                  update=None if carried is None else carried.message)
        except grpc.RpcError as exc:
            if carried is not None and not retryable(exc, overload=False):  # refused: the update does not count
                self.hooks.on_answer(carried.header, None)
            raise
        if carried is not None:
            if not a.HasField("update"):
                log.warning("the coordinator did not answer the update carried by WaitForAssignment for round %d",
                            carried.header.round, extra=fields(event="refused", round=int(carried.header.round)))
            self.hooks.on_answer(carried.header, a.update if a.HasField("update") else None)
            if a.HasField("update") and a.update.accepted:
                carried.accepted(a.update)
        return a

    def _send_carried(self) -> None:
        """Stopping with an update that was to ride on the next long-poll: send it on its own."""
        carried, self._carried = self._carried, None
        if carried is not None:
            try:
                carried.accepted(self._send(carried.header, carried.encoded))
            except grpc.RpcError as exc:
                log.warning("the update for round %d was not sent before stopping: %s", carried.header.round,
                            exc.code().name if isinstance(exc, grpc.Call) else exc)

    def _on_refusal(self, exc: grpc.Call) -> None:
        """Act on the refusal's reason, never on its message (client/session.py after_refusal)."""
        step, label = after_refusal(exc)
        details = exc.details()
        if step is Next.REJOIN:
            log.warning("the coordinator does not know this client (%s); joining again (%s)", details, label,
                        extra=fields(event="rejoining"))
            self.join()
        elif step is Next.NEW_WORK:
            log.warning("work refused (%s); asking for new work (%s)", details, label, extra=fields(event="refused"))
        else:
            code = exc.code()
            what = code.name if label == code.name else f"{code.name} ({label})"
            raise ClientError(f"the coordinator refused this client: {what}: {details}") from None
