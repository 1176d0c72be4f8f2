"""A load-generator process for load_clients.py: many lightweight clients in threads, on the real protocol.

Each client is a thread with its own channel (its own TCP connection: a local subchannel pool)
and speaks the protocol through the client's own client.session.Session (stub, metadata,
retries with client/retry.py's policy) and common/transfer.py:
Join -> WaitForAssignment long-polls -> the parameters from the assignment when they are
inlined, else FetchParameters (digest verified) -> SubmitUpdate (header, chunks, UpdateEnd)
... until FINISHED, then Leave. Transient errors are retried as client/retry.py says;
FAILED_PRECONDITION is recorded and the client asks for new work.
With --resend-every N, some accepted updates are sent a second time (as after a lost reply); the
coordinator must acknowledge them as duplicates without counting them.

No inner loop: a TRAIN update is s * P, P a fixed pattern over the model's flat parameters
with values k/16 (k in -8..8) and s = update_scale(index, round) in 1..16, so every partial
sum the coordinator forms in float32 is exact and load_clients.py can recompute theta bit
for bit. An EVALUATE assignment is answered with metrics only. The last stdout line is JSON:
every submission's outcome and timings (time.monotonic, one clock for every process).

    python benchmarks/_load_worker.py --server 127.0.0.1:PORT --first-index 0 --clients 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmeta.client.retry import RetryPolicy  # noqa: E402
from fedmeta.client.session import Session  # noqa: E402
from fedmeta.common.algorithms import UpdateKind, get_algorithm  # noqa: E402
from fedmeta.common.codec import EncodedTensorSet, TensorSpec, encode, specs_of  # noqa: E402
from fedmeta.common.metrics import placeholder_metrics  # noqa: E402
from fedmeta.common.proto import pb  # noqa: E402
from fedmeta.common.transfer import receive_inline  # noqa: E402

_KIND = {UpdateKind.META_GRADIENT: pb.UPDATE_KIND_META_GRADIENT, UpdateKind.PARAMETER_DELTA: pb.UPDATE_KIND_PARAMETER_DELTA}
_RPC_TIMEOUT_S = 120.0
SCALES = 16


def client_id(index: int) -> str:
    return f"load-{index:04d}"


def update_scale(index: int, round_index: int) -> int:
    """s in 1..16: the multiple of the pattern that client `index` submits in round `round_index`."""
    return 1 + (index * 7 + round_index * 3) % SCALES


def pattern(numel: int) -> torch.Tensor:
    """P: float32 [numel], P[i] = ((7 i) mod 17 - 8) / 16 (exact in float32, as are s * P and their sums)."""
    return ((torch.arange(numel, dtype=torch.int64) * 7) % 17 - 8).to(torch.float32) / 16.0


class Updates:
    """Encoded s * P for each scale s, built once per process for the model's specs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: tuple[TensorSpec, ...] | None = None
        self._cache: dict[int, EncodedTensorSet] = {}

    def get(self, specs: tuple[TensorSpec, ...], scale: int) -> EncodedTensorSet:
        with self._lock:
            if specs != self._specs:
                self._specs, self._cache = specs, {}
            if scale not in self._cache:
                flat = pattern(sum(s.numel for s in specs)) * float(scale)
                views, offset = {}, 0
                for s in specs:
                    views[s.name] = flat[offset : offset + s.numel].view(s.shape)
                    offset += s.numel
                self._cache[scale] = encode(views)  # one flat buffer: the payload is a view, no copy
            return self._cache[scale]


class LoadClient:
    """One lightweight client; records every submission it makes."""

    def __init__(self, index: int, server: str, updates: Updates, give_up_s: float, resend_every: int) -> None:
        self.index = index
        self.resend_every = resend_every
        self.client_id = client_id(index)
        self.updates = updates
        channel = grpc.insecure_channel(server, options=[
            ("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20),
            ("grpc.use_local_subchannel_pool", 1)])  # a connection of its own, like a separate client process
        self.session = Session(channel, client_id=self.client_id, policy=RetryPolicy(give_up_s=give_up_s),
                               rng=random.Random(index), rpc_timeout_s=_RPC_TIMEOUT_S)
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.inlined = 0
        self.fetched = 0
        self.joined_at = 0.0
        self.finished = False
        self.leave_failed = ""

    def join(self) -> None:
        self.run = self.session.join(device="cpu", encodings=["float32"])
        self.kind = _KIND[get_algorithm(self.run.algorithm).update_kind]
        self.joined_at = time.monotonic()

    def _submit(self, header: pb.UpdateHeader, encoded: EncodedTensorSet | None) -> pb.SubmitUpdateResponse:
        return self.session.submit(header, encoded, chunk_bytes=self.run.chunk_bytes)

    def loop(self) -> None:
        held_version: str = ""
        specs: tuple[TensorSpec, ...] | None = None
        while True:
            a = self.session.wait(self.run.run_id, held_version, timeout_s=self.run.poll_timeout_s + 10.0)
            assigned = time.monotonic()
            if a.action == pb.ACTION_FINISHED:
                self.finished = True
                try:  # best effort, as in client.worker: a finished coordinator may already be shutting down
                    self.session.leave(self.run.run_id, timeout_s=10.0)
                except grpc.RpcError as exc:
                    self.leave_failed = exc.code().name if isinstance(exc, grpc.Call) else "error"
                return
            if a.action not in (pb.ACTION_TRAIN, pb.ACTION_EVALUATE):
                continue
            train = a.action == pb.ACTION_TRAIN
            record: dict[str, Any] = {"round": a.round, "action": "train" if train else "evaluate", "assigned": assigned}
            fetched = assigned
            try:
                # max_bytes None: this benchmark trusts its own coordinator to send the model it runs.
                if a.HasField("parameters"):
                    specs = specs_of(receive_inline(a.parameters, max_bytes=None))  # checks size and SHA-256
                    held_version = a.parameter_version
                    self.inlined += 1
                elif a.parameter_version != held_version or specs is None:
                    specs = specs_of(self.session.fetch(self.run.run_id, a.parameter_version, max_bytes=None))
                    held_version = a.parameter_version
                    self.fetched += 1
                fetched = time.monotonic()
                record["scale"] = scale = update_scale(self.index, a.round) if train else 0
                header_msg = pb.UpdateHeader(
                    run_id=self.run.run_id, round=a.round, client_id=self.client_id,
                    base_version=a.parameter_version, kind=self.kind if train else pb.UPDATE_KIND_EVALUATION,
                    weight=1.0, metrics=placeholder_metrics(self.run, evaluation=not train),
                )
                update = self.updates.get(specs, scale) if train else None
                reply = self._submit(header_msg, update)
                record["status"] = "duplicate" if reply.duplicate else "ok"
                if train and self.resend_every and (self.index + a.round) % self.resend_every == 0:
                    # As a client does whose reply was lost: the same update again, to be acknowledged only.
                    record["resend"] = "duplicate" if self._submit(header_msg, update).duplicate else "counted"
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                record["status"] = code.name if code is not None else "error"
                if code != grpc.StatusCode.FAILED_PRECONDITION:
                    self.errors.append(f"round {a.round}: {record['status']}: "
                                       f"{exc.details() if isinstance(exc, grpc.Call) else exc}")
            done = time.monotonic()
            record |= {"fetch_s": fetched - assigned, "submit_s": done - fetched, "done": done}
            self.records.append(record)

    def run_forever(self, start: threading.Barrier) -> None:
        try:
            start.wait()
            self.join()
            self.loop()
        except Exception as exc:  # recorded for load_clients.py, which fails the run on any error
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.session.close()


def run(server: str, indices: Sequence[int], give_up_s: float, resend_every: int) -> dict[str, Any]:
    updates = Updates()
    clients = [LoadClient(i, server, updates, give_up_s, resend_every) for i in indices]
    start = threading.Barrier(len(clients))
    threads = [threading.Thread(target=c.run_forever, args=(start,), name=c.client_id, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": [{"client_id": c.client_id, "index": c.index, "joined_at": c.joined_at, "finished": c.finished,
                         "leave_failed": c.leave_failed,
                         "inlined": c.inlined, "fetched": c.fetched, "retries": c.session.retries, "errors": c.errors,
                         "records": c.records} for c in clients]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--first-index", type=int, required=True, help="index of this process's first client")
    parser.add_argument("--clients", type=int, required=True, help="clients (threads) in this process")
    parser.add_argument("--give-up-s", type=float, default=300.0, help="retry transient errors this long")
    parser.add_argument("--resend-every", type=int, default=0,
                        help="client i resends its accepted update of round r when (i + r) %% N == 0 (0: never)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = run(args.server, range(args.first_index, args.first_index + args.clients), args.give_up_s,
              args.resend_every)
    print(json.dumps(out), flush=True)
    return 0 if all(c["finished"] and not c["errors"] for c in out["clients"]) else 1


if __name__ == "__main__":
    sys.exit(main())
