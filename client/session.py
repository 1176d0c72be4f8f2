"""A client's calls to the coordinator: the stub, the call metadata, retries, one method per RPC.

Used by client/worker.py and by the load generator (benchmarks/_load_worker.py), so every
client speaks the protocol through the same code. Transient failures are retried with
client/retry.py's policy (backoff with jitter, give up after give_up_s); every other status
is raised as grpc.RpcError for the caller to act on. Tensor sets go through common/transfer.py.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import TypeVar

import grpc
import torch

from fedmeta.client.retry import RetryPolicy, with_retry
from fedmeta.common import CLIENT_ID_METADATA, PROTOCOL_VERSION
from fedmeta.common.codec import EncodedTensorSet, TensorSpec
from fedmeta.common.config import RunConfig
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.common.refusal import NEW_WORK, REJOIN, reason_from_metadata
from fedmeta.common.transfer import inline_update, receive_parameters, update_messages
from fedmeta.common.wire import encoding_to_proto, run_config_from_proto

T = TypeVar("T")
RPC_TIMEOUT_S = 60.0


class Next(Enum):
    """What a client does after the coordinator refused a call."""

    REJOIN = "rejoin"
    NEW_WORK = "new work"
    STOP = "stop"


def after_refusal(exc: grpc.Call) -> tuple[Next, str]:
    """(what to do, the reason or status name) for a refusal, from its reason (common/refusal.py),
    never its message: NOT_JOINED and WRONG_RUN rejoin; ROUND_CLOSED, NOT_SAMPLED and STALE_VERSION
    drop the work and ask for new work (under --schedule buffered, STALE_VERSION also answers an update
    more than --max-staleness versions behind: the next assignment names the current θ, which the
    worker fetches, and it trains again); any other reason stops. Without a reason (an older
    coordinator, a proxy), the status code alone: NOT_FOUND rejoins, FAILED_PRECONDITION asks
    for new work, anything else stops."""
    reason = reason_from_metadata(exc.trailing_metadata())
    code = exc.code()
    if reason is not None:
        label = reason.value
        step = Next.REJOIN if reason in REJOIN else Next.NEW_WORK if reason in NEW_WORK else Next.STOP
        return step, label
    if code == grpc.StatusCode.NOT_FOUND:
        return Next.REJOIN, code.name
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Next.NEW_WORK, code.name
    return Next.STOP, code.name if code is not None else "?"


class Session:
    """One client id's calls over one channel; `retries` counts the attempts that were retried."""

    def __init__(self, channel: grpc.Channel, *, client_id: str, token: str | None = None,
                 policy: RetryPolicy = RetryPolicy(), stop: threading.Event | None = None,
                 rng: random.Random | None = None, rpc_timeout_s: float = RPC_TIMEOUT_S) -> None:
        self.channel = channel
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.client_id = client_id
        self.metadata: tuple[tuple[str, str], ...] = ((CLIENT_ID_METADATA, client_id),)
        if token is not None:
            self.metadata += (("authorization", f"Bearer {token}"),)
        self.policy = policy
        self.stop = stop if stop is not None else threading.Event()
        self.rng = rng if rng is not None else random.Random(client_id)
        self.rpc_timeout_s = rpc_timeout_s
        self.retries = 0
        self.inline_updates = True  # until the coordinator answers SubmitInlineUpdate with UNIMPLEMENTED
        self.poll_takes_update = False  # what the coordinator's JoinResponse says (an older one: False)

    def close(self) -> None:
        self.channel.close()

    def _retry(self, call: Callable[[], T], what: str, *, overload: bool = True) -> T:
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return call()

        try:
            return with_retry(attempt, what=what, policy=self.policy, stop=self.stop, rng=self.rng, overload=overload)
        finally:
            self.retries += max(0, attempts - 1)

    def join(self, *, device: str, encodings: Sequence[str]) -> RunConfig:
        """Join the run; the reply's run configuration (ValueError if it is not one this client accepts)."""
        request = pb.JoinRequest(client_id=self.client_id, protocol_version=PROTOCOL_VERSION, device=device,
                                 num_tasks=0, encodings=[encoding_to_proto(e) for e in encodings])  # type: ignore[misc]
        response = self._retry(lambda: self.stub.Join(request, timeout=self.rpc_timeout_s, metadata=self.metadata),
                               "Join")
        config = run_config_from_proto(response.config)
        self.poll_takes_update = bool(response.poll_takes_update)
        return config

    def wait(self, run_id: str, held_version: str, *, timeout_s: float,
             update: pb.InlineUpdate | None = None) -> pb.WaitForAssignmentResponse:
        """One long-poll for work; timeout_s is the call's deadline (the coordinator's poll timeout and a margin).

        `update` (from carry()) rides along: the reply's `update` answers it, a refusal of it is
        raised as SubmitInlineUpdate's would be, and a retry sends it again (a duplicate is
        acknowledged, never counted twice)."""
        request = pb.WaitForAssignmentRequest(run_id=run_id, client_id=self.client_id, held_version=held_version,
                                              update=update)
        return self._retry(lambda: self.stub.WaitForAssignment(request, timeout=timeout_s, metadata=self.metadata),
                           "WaitForAssignment", overload=update is None)

    def carry(self, header: pb.UpdateHeader, encoded: EncodedTensorSet | None) -> pb.InlineUpdate | None:
        """The update as the next long-poll's `update`, or None where it must go on its own (a
        coordinator that does not take it, or a payload over 64 KiB)."""
        return inline_update(header, encoded) if self.poll_takes_update and self.inline_updates else None

    def fetch(self, run_id: str, version: str, *, max_bytes: int | None,
              expected: Sequence[TensorSpec] | None = None) -> dict[str, torch.Tensor]:
        """θ at `version`, bounded by max_bytes and checked against `expected` (TensorSetError if not)."""
        request = pb.FetchParametersRequest(run_id=run_id, client_id=self.client_id, parameter_version=version)

        def fetch() -> dict[str, torch.Tensor]:
            stream: Iterator[pb.FetchParametersResponse] = self.stub.FetchParameters(
                request, timeout=self.rpc_timeout_s, metadata=self.metadata)
            return receive_parameters(stream, max_bytes=max_bytes, expected=expected)[1]

        return self._retry(fetch, "FetchParameters")

    def submit(self, header: pb.UpdateHeader, encoded: EncodedTensorSet | None, *,
               chunk_bytes: int) -> pb.SubmitUpdateResponse:
        """One update: in one message (SubmitInlineUpdate) when its payload is at most 64 KiB, else
        streamed (header, chunks, end); a retry sends the whole update again. A coordinator that
        does not serve SubmitInlineUpdate (UNIMPLEMENTED: an older release) gets streams from then on."""
        # overload=False: RESOURCE_EXHAUSTED on an update is its size cap, which no retry fixes.
        message = inline_update(header, encoded) if self.inline_updates else None
        if message is not None:
            try:
                return self._retry(lambda: self.stub.SubmitInlineUpdate(message, timeout=self.rpc_timeout_s,
                                                                        metadata=self.metadata),
                                   "SubmitInlineUpdate", overload=False)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.inline_updates = False
        return self._retry(lambda: self.stub.SubmitUpdate(update_messages(header, encoded, chunk_bytes),
                                                          timeout=self.rpc_timeout_s, metadata=self.metadata),
                           "SubmitUpdate", overload=False)

    def heartbeat(self, run_id: str, round_index: int, *, timeout_s: float) -> bool:
        """Tell the coordinator this client is alive in round_index (no retry); whether it is still needed."""
        request = pb.HeartbeatRequest(run_id=run_id, client_id=self.client_id, round=round_index)
        return bool(self.stub.Heartbeat(request, timeout=timeout_s, metadata=self.metadata).still_needed)

    def leave(self, run_id: str, *, timeout_s: float) -> None:
        """Leave the run (no retry: a finished coordinator may already be shutting down)."""
        self.stub.Leave(pb.LeaveRequest(run_id=run_id, client_id=self.client_id), timeout=timeout_s,
                        metadata=self.metadata)
