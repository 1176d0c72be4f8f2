"""A load-generator process for load_clients.py at 10,000 clients: each client is a coroutine.

benchmarks/_load_worker.py gives each client a thread and a connection of its own, which
stops at a few hundred clients per process. Here a process runs thousands of clients as
coroutines on one asyncio event loop, --clients-per-channel of them sharing a channel (its own
TCP connection; calls are the threaded client's futures, see rpc()), and speaks the same protocol with the same updates (s * P, exact in float32,
so load_clients.py replays θ bit for bit): Join -> WaitForAssignment long-polls -> the
inlined parameters (digest checked) or FetchParameters -> the update carried by the next
long-poll (WaitForAssignment.update, where the coordinator's JoinResponse says it takes it; the
sinusoid MLP's update is 7 KB), or with --no-carry SubmitInlineUpdate (one message) or
SubmitUpdate (header, chunks, UpdateEnd), until FINISHED, then Leave. UNAVAILABLE and RESOURCE_EXHAUSTED are retried after a
jittered pause (as client/retry.py does); FAILED_PRECONDITION is recorded and the client asks
for new work; anything else is an error. The last stdout line is JSON, as _load_worker.py's.

    python benchmarks/_aio_load_worker.py --server 127.0.0.1:PORT --first-index 0 --clients 2500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._load_worker import Updates, client_id, update_scale  # noqa: E402
from fedmeta.common import CLIENT_ID_METADATA, PROTOCOL_VERSION  # noqa: E402
from fedmeta.common.algorithms import UpdateKind, get_algorithm  # noqa: E402
from fedmeta.common.codec import TensorSpec, specs_of  # noqa: E402
from fedmeta.common.metrics import placeholder_metrics  # noqa: E402
from fedmeta.common.proto import pb, pb_grpc  # noqa: E402
from fedmeta.common.transfer import inline_update, receive_inline, receive_parameters, update_messages  # noqa: E402
from fedmeta.common.wire import encoding_to_proto, run_config_from_proto  # noqa: E402

T = TypeVar("T")
_KIND = {UpdateKind.META_GRADIENT: pb.UPDATE_KIND_META_GRADIENT, UpdateKind.PARAMETER_DELTA: pb.UPDATE_KIND_PARAMETER_DELTA}
# as client/retry.py: CANCELLED is the coordinator's shutdown grace or its stream idle timer
_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.CANCELLED}
_RPC_TIMEOUT_S = 120.0


async def rpc(method: Any, request: Any, **kwargs: Any) -> Any:
    """Await a call made with the threaded client's `.future()` (no thread per call; the channel's
    own poller completes it). grpcio 1.85's asyncio client cancels calls with a bare CANCELLED when
    many start at once against a busy server (3,000 concurrent health checks: 727 CANCELLED, against
    a grpc.aio or a threaded server alike); the threaded client's futures do not (0 of 3,000)."""
    future = method.future(request, **kwargs)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(_: Any) -> None:
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    future.add_done_callback(settle)
    try:
        await done
    except asyncio.CancelledError:
        future.cancel()
        raise
    return future.result()


class Pacer:
    """A token bucket for call starts: a load process starts at most `rate` calls a second, in
    bursts of at most `burst` (10,000 clients joining at once would otherwise be a burst no real
    federation sends)."""

    def __init__(self, rate: float = 1000.0, burst: float = 200.0) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    async def start(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class AioClient:
    def __init__(self, index: int, stub: pb_grpc.CoordinatorStub, updates: Updates, give_up_s: float,
                 resend_every: int, pacer: Pacer, carry: bool = True) -> None:
        self.pacer = pacer
        self.index = index
        self.client_id = client_id(index)
        self.stub = stub
        self.updates = updates
        self.give_up_s = give_up_s
        self.resend_every = resend_every
        self.metadata = ((CLIENT_ID_METADATA, self.client_id),)
        self.rng = random.Random(index)
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.retries = self.inlined = self.fetched = 0
        self.retry_codes: dict[str, int] = {}
        self.retry_details: dict[str, str] = {}
        self.joined_at = 0.0
        self.finished = False
        self.leave_failed = ""
        self.carry = carry  # a training update rides on the next long-poll, where the coordinator takes it
        self.takes_update = False  # what the coordinator's JoinResponse says
        self.carried = 0

    async def _retry(self, call: Callable[[], Awaitable[T]], what: str = "") -> T:
        deadline = time.monotonic() + self.give_up_s
        pause = 0.2
        while True:
            await self.pacer.start()
            try:
                return await call()
            except grpc.RpcError as exc:
                if exc.code() not in _RETRY or time.monotonic() > deadline:
                    raise
                self.retries += 1
                key = f"{what}:{exc.code().name}"
                self.retry_codes[key] = self.retry_codes.get(key, 0) + 1
                self.retry_details.setdefault(key, str(exc.details())[:200])
                await asyncio.sleep(pause * (0.5 + self.rng.random()))
                pause = min(pause * 2, 5.0)

    async def join(self) -> None:
        request = pb.JoinRequest(client_id=self.client_id, protocol_version=PROTOCOL_VERSION, device="cpu",
                                 encodings=[encoding_to_proto("float32")])  # type: ignore[list-item]
        reply = await self._retry(lambda: rpc(self.stub.Join, request, timeout=_RPC_TIMEOUT_S, metadata=self.metadata),
                                  "Join")
        self.run = run_config_from_proto(reply.config)
        self.takes_update = bool(reply.poll_takes_update)
        self.kind = _KIND[get_algorithm(self.run.algorithm).update_kind]
        self.joined_at = time.monotonic()

    async def _fetch(self, version: str) -> tuple[TensorSpec, ...]:
        async def call() -> list[pb.FetchParametersResponse]:
            request = pb.FetchParametersRequest(run_id=self.run.run_id, client_id=self.client_id,
                                                parameter_version=version)
            return await asyncio.to_thread(  # a stream: rare here (the sinusoid MLP is inlined)
                lambda: list(self.stub.FetchParameters(request, timeout=_RPC_TIMEOUT_S, metadata=self.metadata)))
        messages = await self._retry(call, "FetchParameters")
        return specs_of(receive_parameters(iter(messages), max_bytes=None)[1])

    async def _submit(self, header: pb.UpdateHeader, encoded: Any) -> pb.SubmitUpdateResponse:
        message = inline_update(header, encoded)  # as client/session.py does (small updates in one message)
        if message is not None:
            return await self._retry(lambda: rpc(
                self.stub.SubmitInlineUpdate, message, timeout=_RPC_TIMEOUT_S, metadata=self.metadata),
                "SubmitInlineUpdate")
        return await self._retry(lambda: rpc(
            self.stub.SubmitUpdate, update_messages(header, encoded, self.run.chunk_bytes), timeout=_RPC_TIMEOUT_S, metadata=self.metadata),
            "SubmitUpdate")

    async def loop(self) -> None:
        held_version = ""
        specs: tuple[TensorSpec, ...] | None = None
        # a trained update waiting to ride on the next long-poll: its record, header, tensors, message
        pending: tuple[dict[str, Any], pb.UpdateHeader, Any, pb.InlineUpdate] | None = None
        while True:
            request = pb.WaitForAssignmentRequest(run_id=self.run.run_id, client_id=self.client_id,
                                                  held_version=held_version,
                                                  update=None if pending is None else pending[3])
            try:
                a = await self._retry(lambda: rpc(
                    self.stub.WaitForAssignment, request, timeout=self.run.poll_timeout_s + 10.0, metadata=self.metadata), "WaitForAssignment")
            except grpc.RpcError as exc:
                if pending is None:
                    raise
                record = pending[0]  # the carried update was refused: as a refused SubmitInlineUpdate
                pending = None
                record["status"] = exc.code().name
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    self.errors.append(f"round {record['round']}: {exc.code().name}: {exc.details()}")
                continue
            assigned = time.monotonic()
            if pending is not None:
                record, header, tensors, _ = pending
                pending = None
                if a.HasField("update"):
                    record["status"] = "duplicate" if a.update.duplicate else "ok"
                    if self.resend_every and (self.index + record["round"]) % self.resend_every == 0:
                        record["resend"] = "duplicate" if (await self._submit(header, tensors)).duplicate else "counted"
                else:
                    record["status"] = "unanswered"
                    self.errors.append(f"round {record['round']}: the long-poll's reply did not answer its update")
            if a.action == pb.ACTION_FINISHED:
                self.finished = True
                try:
                    await self.pacer.start()
                    await rpc(self.stub.Leave, pb.LeaveRequest(run_id=self.run.run_id, client_id=self.client_id),
                              timeout=10.0, metadata=self.metadata)
                except grpc.RpcError as exc:
                    self.leave_failed = exc.code().name
                return
            if a.action not in (pb.ACTION_TRAIN, pb.ACTION_EVALUATE):
                continue
            train = a.action == pb.ACTION_TRAIN
            record: dict[str, Any] = {"round": a.round, "action": "train" if train else "evaluate", "assigned": assigned}
            fetched = assigned
            try:
                if a.HasField("parameters"):
                    specs = specs_of(receive_inline(a.parameters, max_bytes=None))  # size and SHA-256 checked
                    held_version = a.parameter_version
                    self.inlined += 1
                elif a.parameter_version != held_version or specs is None:
                    specs = await self._fetch(a.parameter_version)
                    held_version = a.parameter_version
                    self.fetched += 1
                fetched = time.monotonic()
                record["scale"] = scale = update_scale(self.index, a.round) if train else 0
                header = pb.UpdateHeader(
                    run_id=self.run.run_id, round=a.round, client_id=self.client_id,
                    base_version=a.parameter_version, kind=self.kind if train else pb.UPDATE_KIND_EVALUATION,
                    weight=1.0, metrics=placeholder_metrics(self.run, evaluation=not train))
                update = self.updates.get(specs, scale) if train else None
                message = inline_update(header, update) if train and self.carry and self.takes_update else None
                if message is not None:  # sent with the next long-poll, which answers it
                    record |= {"fetch_s": fetched - assigned, "submit_s": None, "done": time.monotonic(),
                               "carried": True}
                    self.records.append(record)
                    pending = (record, header, update, message)
                    self.carried += 1
                    continue
                reply = await self._submit(header, update)
                record["status"] = "duplicate" if reply.duplicate else "ok"
                if train and self.resend_every and (self.index + a.round) % self.resend_every == 0:
                    record["resend"] = "duplicate" if (await self._submit(header, update)).duplicate else "counted"
            except grpc.RpcError as exc:
                record["status"] = exc.code().name
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    self.errors.append(f"round {a.round}: {exc.code().name}: {exc.details()}")
            done = time.monotonic()
            record |= {"fetch_s": fetched - assigned, "submit_s": done - fetched, "done": done}
            self.records.append(record)

    async def run_forever(self) -> None:
        try:
            await self.join()
            await self.loop()
        except Exception as exc:  # recorded for load_clients.py, which fails the run on any error
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def report(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "index": self.index, "joined_at": self.joined_at,
                "finished": self.finished, "leave_failed": self.leave_failed, "inlined": self.inlined,
                "fetched": self.fetched, "carried": self.carried, "retries": self.retries, "retry_codes": self.retry_codes, "retry_details": self.retry_details, "errors": self.errors, "records": self.records}


async def run(server: str, first: int, n: int, per_channel: int, give_up_s: float,
              resend_every: int, carry: bool = True) -> dict[str, Any]:
    updates = Updates()
    options = [("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20),
               ("grpc.use_local_subchannel_pool", 1)]  # each channel a connection of its own
    channels = [grpc.insecure_channel(server, options=options) for _ in range((n + per_channel - 1) // per_channel)]
    pacer = Pacer()
    clients = [AioClient(first + i, pb_grpc.CoordinatorStub(channels[i // per_channel]), updates, give_up_s,
                         resend_every, pacer, carry) for i in range(n)]
    try:
        await asyncio.gather(*(c.run_forever() for c in clients))
    finally:
        for ch in channels:
            ch.close()
    return {"clients": [c.report() for c in clients]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--first-index", type=int, required=True, help="index of this process's first client")
    parser.add_argument("--clients", type=int, required=True, help="clients (coroutines) in this process")
    parser.add_argument("--clients-per-channel", type=int, default=50, help="clients sharing one connection")
    parser.add_argument("--give-up-s", type=float, default=300.0, help="retry transient errors this long")
    parser.add_argument("--resend-every", type=int, default=0,
                        help="client i resends its accepted update of round r when (i + r) %% N == 0 (0: never)")
    parser.add_argument("--no-carry", action="store_true",
                        help="send every update on its own call, never with the next long-poll")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = asyncio.run(run(args.server, args.first_index, args.clients, max(1, args.clients_per_channel),
                          args.give_up_s, args.resend_every, not args.no_carry))
    print(json.dumps(out), flush=True)
    return 0 if all(c["finished"] and not c["errors"] for c in out["clients"]) else 1


if __name__ == "__main__":
    sys.exit(main())
