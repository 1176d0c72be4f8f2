"""Typed refusals: the coordinator sends a reason with every refusal; the client acts on it, never on the text.

A fake coordinator (a real gRPC server on 127.0.0.1 with a scripted servicer) refuses the
worker's long-poll with chosen codes, reasons and messages; the worker's Join count shows
what it did. The real coordinator's refusals are checked for their reason with raw stubs.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from fedmeta.client.retry import RetryPolicy
from fedmeta.client.worker import ClientConfig, ClientError, Worker
from fedmeta.common import PROTOCOL_VERSION
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.common.refusal import REASON_KEY, Reason, reason_from_metadata, reason_metadata
from fedmeta.common.wire import run_config_to_proto
from fedmeta.server.config import build

pytestmark = pytest.mark.integration

UNRELATED = "the moon is made of cheese"  # no "call Join", no "version": only the reason can say what to do


@dataclass
class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Answers Join with a sinusoid run; refuses the first long-poll as scripted, then says FINISHED."""

    refusal: tuple[grpc.StatusCode, str, Reason | None]
    joins: int = 0
    polls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Join(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            self.joins += 1
        return pb.JoinResponse(config=run_config_to_proto(build({"run_dir": "unused", "rounds": 1}).run))

    def WaitForAssignment(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            self.polls += 1
            first = self.polls == 1
        if first:
            code, message, reason = self.refusal
            if reason is not None:
                context.set_trailing_metadata(reason_metadata(reason))
            context.abort(code, message)
        return pb.WaitForAssignmentResponse(action=pb.ACTION_FINISHED)

    def Leave(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LeaveResponse()


def run_worker(refusal: tuple[grpc.StatusCode, str, Reason | None]) -> tuple[FakeCoordinator, object]:
    """Run a real Worker against the fake; returns the fake and the worker's exit code or exception."""
    fake = FakeCoordinator(refusal)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    outcome: list[object] = []
    try:
        worker = Worker(ClientConfig(server=f"127.0.0.1:{port}", client_id="c0", data_seed=1,
                                     retry=RetryPolicy(give_up_s=10.0)))

        def run() -> None:
            try:
                outcome.append(worker.run_forever())
            except ClientError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert outcome, "the worker did not end"
        worker.channel.close()
    finally:
        server.stop(grace=None)
    return fake, outcome[0]


P, NF = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("refusal, joins", [
    ((NF, UNRELATED, Reason.NOT_JOINED), 2),  # rejoins on the reason, whatever the message says
    ((P, UNRELATED, Reason.WRONG_RUN), 2),
    ((P, "client 'c0' has not joined: call Join first", None), 1),  # no reason: FAILED_PRECONDITION is new work
    ((NF, UNRELATED, None), 2),  # no reason: NOT_FOUND rejoins by its code
    ((NF, "call Join first", Reason.STALE_VERSION), 1),  # the reason decides, not the code or the text
    ((P, UNRELATED, Reason.ROUND_CLOSED), 1),
], ids=["not-joined", "wrong-run", "precondition-without-reason", "not-found-without-reason",
        "reason-over-code-and-text", "round-closed"])
def test_the_worker_acts_on_the_reason_not_the_message(refusal, joins) -> None:
    fake, outcome = run_worker(refusal)
    assert outcome == 0, outcome
    assert fake.joins == joins, f"expected {joins} Join calls, got {fake.joins}"
    assert fake.polls == 2, "after the refusal the worker asks for work again"


def test_a_reason_the_worker_cannot_act_on_stops_it_even_if_the_text_says_call_join() -> None:
    fake, outcome = run_worker((grpc.StatusCode.INVALID_ARGUMENT, "call Join first", Reason.BAD_WEIGHT))
    assert isinstance(outcome, ClientError) and "BAD_WEIGHT" in str(outcome), outcome
    assert fake.joins == 1


def test_an_unknown_reason_is_handled_by_the_status_code() -> None:
    assert reason_from_metadata(((REASON_KEY, "SOMETHING_NEWER"),)) is None
    fake, outcome = run_worker((NF, UNRELATED, None))
    assert outcome == 0 and fake.joins == 2


def reason_of(err: grpc.RpcError) -> Reason | None:
    assert isinstance(err, grpc.Call)
    return reason_from_metadata(err.trailing_metadata())


def test_the_coordinator_sends_the_reason_with_each_refusal(inprocess_server) -> None:
    server = inprocess_server(clients_per_round=1, min_clients=1, round_deadline_s=60.0)
    stub = server.stub
    run_id = server.coordinator.run.run_id
    with pytest.raises(grpc.RpcError) as info:
        stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, client_id="nobody", round=0), timeout=5)
    assert info.value.code() == NF and reason_of(info.value) == Reason.NOT_JOINED

    stub.Join(pb.JoinRequest(client_id="alice", protocol_version=PROTOCOL_VERSION), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.Heartbeat(pb.HeartbeatRequest(run_id="other-run", client_id="alice", round=0), timeout=5)
    assert info.value.code() == P and reason_of(info.value) == Reason.WRONG_RUN

    with pytest.raises(grpc.RpcError) as info:
        list(stub.FetchParameters(pb.FetchParametersRequest(run_id=run_id, client_id="alice",
                                                            parameter_version="0" * 64), timeout=5))
    assert info.value.code() == P and reason_of(info.value) == Reason.STALE_VERSION

    header = pb.UpdateHeader(run_id=run_id, round=7, client_id="alice", base_version=server.coordinator.version,
                             kind=pb.UPDATE_KIND_META_GRADIENT, weight=1.0)
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitUpdate(iter([pb.SubmitUpdateRequest(header=header), pb.SubmitUpdateRequest(end=pb.UpdateEnd())]),
                          timeout=5)
    assert info.value.code() == P and reason_of(info.value) == Reason.ROUND_CLOSED

    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(client_id="bad id!", protocol_version=PROTOCOL_VERSION), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(info.value) == Reason.BAD_CLIENT_ID
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(client_id="bob", protocol_version=PROTOCOL_VERSION + 1), timeout=5)
    assert info.value.code() == P and reason_of(info.value) == Reason.BAD_PROTOCOL
