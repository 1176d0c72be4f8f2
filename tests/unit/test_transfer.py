"""common/transfer.py: the one sender and receiver of tensor sets over the RPC streams (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.codec import TensorSetError, TensorSetTooLarge, TensorSpec, encode, specs_of
from fedmeta.common.proto import pb, tensor_pb
from fedmeta.common.transfer import (
    CHUNK_OVERHEAD_BYTES,
    PARAMETERS,
    UPDATE,
    WireBytes,
    parameter_messages,
    receive_inline,
    receive_parameters,
    receive_tensor_set,
    update_messages,
)
from fedmeta.common.wire import header_from_proto, header_to_proto

CHUNK = 1000


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 60, generator=g), "b": torch.randn(60, generator=g), "n": torch.arange(5)}


def update_stream(t: dict[str, torch.Tensor]) -> list[pb.SubmitUpdateRequest]:
    return list(update_messages(pb.UpdateHeader(client_id="a", round=3), encode(t), CHUNK))


def test_update_stream_is_header_chunks_end_and_round_trips() -> None:
    t = tensors()
    messages = update_stream(t)
    kinds = [m.WhichOneof("message") for m in messages]
    assert kinds[0] == "header" and kinds[-1] == "end" and set(kinds[1:-1]) == {"chunk"}
    assert all(len(m.chunk.data) <= CHUNK for m in messages[1:-1])
    header = header_from_proto(messages[0].header.tensors)
    count = WireBytes()
    got = receive_tensor_set(UPDATE, header, iter(messages[1:]), max_bytes=header.total_bytes, count=count)
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)
    # The coordinator's byte count: data plus 16 per chunk, nothing for the end message.
    assert count.total == sum(len(m.chunk.data) + CHUNK_OVERHEAD_BYTES for m in messages[1:-1])


def test_evaluation_update_is_header_and_end() -> None:
    messages = list(update_messages(pb.UpdateHeader(client_id="a"), None, CHUNK))
    assert [m.WhichOneof("message") for m in messages] == ["header", "end"]
    assert not messages[0].header.HasField("tensors")


def test_nothing_after_the_end_message_is_read() -> None:
    messages = update_stream(tensors())

    def then_fail() -> Iterator[pb.SubmitUpdateRequest]:
        yield from messages[1:]
        raise AssertionError("the receiver read past the end message")

    header = header_from_proto(messages[0].header.tensors)
    assert receive_tensor_set(UPDATE, header, then_fail(), max_bytes=1 << 20)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda m: m[1:-1], "the update stream ended without its end message; the update is not counted"),
        (lambda m: [m[1], m[0], *m[2:]], "after the header, SubmitUpdate takes chunk messages, then one end message"),
        (lambda m: [m[2], m[1], *m[3:]], "out of order"),
        (lambda m: [m[1], m[-1]], "stream ended after"),
    ],
    ids=["no-end", "second-header", "out-of-order", "short"],
)
def test_bad_update_streams_are_refused(cut, message) -> None:  # type: ignore[no-untyped-def]
    messages = update_stream(tensors())
    header = header_from_proto(messages[0].header.tensors)
    count = WireBytes()
    with pytest.raises(TensorSetError, match=message):
        receive_tensor_set(UPDATE, header, iter(cut(messages)), max_bytes=1 << 20, count=count)


def test_size_cap_and_expected_specs_come_before_the_buffer() -> None:
    # A header that claims 4 TiB: refused by its specs or its size before anything is allocated.
    huge = tensor_pb.TensorSetHeader(tensors=[tensor_pb.TensorSpec(name="w", dtype=tensor_pb.DTYPE_FLOAT32,
                                                                   shape=[1 << 20, 1 << 20])],
                                     total_bytes=4 << 40, sha256=bytes(32), encoding=tensor_pb.ENCODING_FLOAT32)
    header = header_from_proto(huge)
    with pytest.raises(TensorSetError, match="tensor names do not match the model"):
        receive_tensor_set(UPDATE, header, iter([]), max_bytes=None, expected=(TensorSpec("v", "float32", (2,)),))
    with pytest.raises(TensorSetTooLarge, match="over the cap of 1000 bytes"):
        receive_tensor_set(UPDATE, header, iter([]), max_bytes=1000)
    with pytest.raises(TensorSetTooLarge):
        receive_inline(pb.InlineParameters(tensors=huge), max_bytes=1000)


def test_parameter_stream_and_inline_round_trip() -> None:
    t = tensors(1)
    encoded = encode(t)
    version, got = receive_parameters(parameter_messages("v1", encoded, CHUNK), max_bytes=encoded.header.total_bytes,
                                      expected=specs_of(t))
    assert version == "v1" and all(torch.equal(got[k], t[k]) for k in t)
    inline = pb.InlineParameters(tensors=header_to_proto(encoded.header), payload=bytes(encoded.payload))
    got = receive_inline(inline, max_bytes=None, expected=specs_of(t))
    assert all(torch.equal(got[k], t[k]) for k in t)
    with pytest.raises(TensorSetError, match="did not start with a header"):
        receive_parameters(iter(list(parameter_messages("v1", encoded, CHUNK))[1:]), max_bytes=None)
    bad = list(parameter_messages("v1", encoded, CHUNK))
    bad[2] = pb.FetchParametersResponse(header=bad[0].header)
    with pytest.raises(TensorSetError, match="after the header, FetchParameters takes chunk messages$"):
        receive_parameters(iter(bad), max_bytes=None)
    assert PARAMETERS.end is None and UPDATE.end is not None
