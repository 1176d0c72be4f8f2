"""client/session.py sends a small update in one message, a large one as a stream, and falls back
to streams for good when a coordinator (an older release) answers SubmitInlineUpdate with
UNIMPLEMENTED. Real gRPC servers on 127.0.0.1 that record which RPC carried each update."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch

from fedmeta.client.session import Session
from fedmeta.common.codec import decode, encode
from fedmeta.common.proto import pb
from fedmeta.common.transfer import INLINE_UPDATE_MAX_BYTES, collect_inline_update, receive_tensor_set, UPDATE
from fedmeta.common.wire import header_from_proto

pytestmark = pytest.mark.integration

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class Recorder:
    """The Coordinator's two update RPCs (or only the stream, as an older coordinator), decoding what arrives."""

    def __init__(self, *, inline: bool) -> None:
        self.calls: list[tuple[str, dict[str, torch.Tensor]]] = []
        handlers = {"SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            self.stream, request_deserializer=pb.SubmitUpdateRequest.FromString,
            response_serializer=pb.SubmitUpdateResponse.SerializeToString)}
        if inline:
            handlers["SubmitInlineUpdate"] = grpc.unary_unary_rpc_method_handler(
                self.inline, request_deserializer=pb.InlineUpdate.FromString,
                response_serializer=pb.SubmitUpdateResponse.SerializeToString)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stream(self, requests, context) -> pb.SubmitUpdateResponse:
        first = next(requests)
        tensors = receive_tensor_set(UPDATE, header_from_proto(first.header.tensors), requests, max_bytes=1 << 26)
        self.calls.append(("SubmitUpdate", tensors))
        return pb.SubmitUpdateResponse(accepted=True)

    def inline(self, request: pb.InlineUpdate, context) -> pb.SubmitUpdateResponse:
        payload = collect_inline_update(request, header_from_proto(request.header.tensors), max_bytes=1 << 26)
        self.calls.append(("SubmitInlineUpdate", decode(payload)))
        return pb.SubmitUpdateResponse(accepted=True)


@pytest.fixture
def recorder(request):
    made: list[Recorder] = []

    def make(*, inline: bool) -> Recorder:
        made.append(Recorder(inline=inline))
        return made[-1]
    yield make
    for r in made:
        r.server.stop(grace=None)


def submit(r: Recorder, session: Session, tensors: dict[str, torch.Tensor]) -> None:
    header = pb.UpdateHeader(run_id="r", round=0, client_id="alice", base_version="v",
                             kind=pb.UPDATE_KIND_META_GRADIENT, weight=1.0)
    reply = session.submit(header, encode(tensors), chunk_bytes=4096)
    assert reply.accepted


def test_small_updates_go_in_one_message_and_large_ones_as_streams(recorder) -> None:
    r = recorder(inline=True)
    session = Session(grpc.insecure_channel(f"127.0.0.1:{r.port}"), client_id="alice")
    small = {"w": torch.arange(100, dtype=torch.float32)}
    large = {"w": torch.arange(INLINE_UPDATE_MAX_BYTES // 4 + 1, dtype=torch.float32)}  # 4 bytes over the cap
    submit(r, session, small)
    submit(r, session, large)
    assert [name for name, _ in r.calls] == ["SubmitInlineUpdate", "SubmitUpdate"]
    assert torch.equal(r.calls[0][1]["w"], small["w"]) and torch.equal(r.calls[1][1]["w"], large["w"])
    session.close()


def test_an_older_coordinator_without_inline_updates_gets_streams_from_then_on(recorder) -> None:
    r = recorder(inline=False)
    session = Session(grpc.insecure_channel(f"127.0.0.1:{r.port}"), client_id="alice")
    small = {"w": torch.ones(10)}
    submit(r, session, small)
    assert not session.inline_updates
    submit(r, session, small)
    assert [name for name, _ in r.calls] == ["SubmitUpdate", "SubmitUpdate"]
    assert all(torch.equal(t["w"], small["w"]) for _, t in r.calls)
    session.close()
