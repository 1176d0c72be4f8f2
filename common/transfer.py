"""Tensor sets over the RPCs' streams: one sender and one receiver for every chunked transfer.

A transfer is a head message whose header describes the tensor set (common/codec.py), the
payload in chunks of at most chunk_bytes, and, where the stream says so, an end message:

    FetchParameters   (server stream)   header{version, tensors}  chunk*
    SubmitUpdate      (client stream)   header{update, tensors}   chunk*  end
    SubmitInlineUpdate (one message)    header{update, tensors}, payload   (payloads <= 64 KiB)
    WaitForAssignment.update            the same message, carried by the client's next long-poll
    WaitForAssignment (one message)     parameters{tensors, payload}      (small models, inlined)

The receiver trusts nothing it is sent: the header is checked against the expected specs
(when given) before a buffer of at most max_bytes is allocated, chunks must arrive in order
without overrunning the declared size, an end message (where the stream has one) must close
the stream and nothing after it is read, and the SHA-256 digest must match.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fedmeta.common.codec import (EncodedTensorSet, Reassembler, TensorSetError, TensorSetHeader, TensorSpec, check_specs,
                          decode, iter_chunks)
from fedmeta.common.proto import pb, tensor_pb
from fedmeta.common.wire import chunk_from_proto, chunk_to_proto, header_from_proto, header_to_proto

M = TypeVar("M")
# The largest payload SubmitInlineUpdate takes: gRPC holds a unary request whole before the
# coordinator reads it, so what a peer can make it hold is this times --max-streams.
INLINE_UPDATE_MAX_BYTES = 64 * 1024
# What the coordinator's byte counters add per chunk message besides its data (field tags, lengths).
CHUNK_OVERHEAD_BYTES = 16


@dataclass(frozen=True)
class Stream(Generic[M]):
    """How one RPC's stream carries a tensor set after its head message."""

    rpc: str  # the RPC's name, as errors name it
    what: str  # what the stream carries ("update"), as errors name it
    chunk: Callable[[tensor_pb.TensorChunk], M]  # wraps a chunk into the stream's message
    end: Callable[[], M] | None = None  # the message that closes the stream; None: the stream's own end

    def not_a_chunk(self) -> str:
        then = ", then one end message" if self.end is not None else ""
        return f"after the header, {self.rpc} takes chunk messages{then}"


PARAMETERS: Stream[pb.FetchParametersResponse] = Stream(
    "FetchParameters", "parameter", lambda c: pb.FetchParametersResponse(chunk=c))
UPDATE: Stream[pb.SubmitUpdateRequest] = Stream(
    "SubmitUpdate", "update", lambda c: pb.SubmitUpdateRequest(chunk=c), lambda: pb.SubmitUpdateRequest(end=pb.UpdateEnd()))


def message_bytes(msg: Any) -> int:
    """Bytes of a stream message as the coordinator counts them: a chunk's data plus
    CHUNK_OVERHEAD_BYTES, nothing for an end message, the encoded size of anything else."""
    kind = msg.WhichOneof("message")
    if kind == "chunk":
        return len(msg.chunk.data) + CHUNK_OVERHEAD_BYTES
    return 0 if kind == "end" else int(msg.ByteSize())


class WireBytes:
    """A running count of message_bytes over the messages of one call."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, msg: Any) -> None:
        self.total += message_bytes(msg)


# ---- sending ----------------------------------------------------------------------------------------
def send_tensor_set(stream: Stream[M], head: M, payload: memoryview | None, chunk_bytes: int) -> Iterator[M]:
    """The messages of one transfer: head, the payload in chunks of at most chunk_bytes, the end message."""
    yield head
    if payload is not None:
        for offset, data in iter_chunks(payload, chunk_bytes):
            yield stream.chunk(chunk_to_proto(offset, data))
    if stream.end is not None:
        yield stream.end()


def parameter_messages(version: str, encoded: EncodedTensorSet, chunk_bytes: int) -> Iterator[pb.FetchParametersResponse]:
    """FetchParameters' response stream for θ at `version`."""
    head = pb.FetchParametersResponse(
        header=pb.ParametersHeader(parameter_version=version, tensors=header_to_proto(encoded.header)))
    return send_tensor_set(PARAMETERS, head, encoded.payload, chunk_bytes)


def update_messages(header: pb.UpdateHeader, encoded: EncodedTensorSet | None,
                    chunk_bytes: int) -> Iterator[pb.SubmitUpdateRequest]:
    """SubmitUpdate's request stream: the update header (with the tensors' header when there are
    tensors), their chunks, the end message. An evaluation update (encoded None) is header and end."""
    if encoded is not None:
        header.tensors.CopyFrom(header_to_proto(encoded.header))
    return send_tensor_set(UPDATE, pb.SubmitUpdateRequest(header=header),
                           encoded.payload if encoded is not None else None, chunk_bytes)


# ---- receiving --------------------------------------------------------------------------------------
def _chunks(stream: Stream[Any], messages: Iterable[Any], count: WireBytes | None) -> Iterator[tuple[int, bytes]]:
    for msg in messages:
        if stream.end is not None and msg.HasField("end"):
            return  # the transfer is complete; nothing after its end is read
        if not msg.HasField("chunk"):
            raise TensorSetError(stream.not_a_chunk())
        if count is not None:
            count.add(msg)
        yield chunk_from_proto(msg.chunk)
    if stream.end is not None:
        raise TensorSetError(f"the {stream.what} stream ended without its end message; the {stream.what} is not counted")


def _reassemble(header: TensorSetHeader, chunks: Iterable[tuple[int, bytes]], *, max_bytes: int | None,
                expected: Sequence[TensorSpec] | None) -> dict[str, torch.Tensor]:
    """Check the header against `expected` and the cap, then collect, verify and decode the payload."""
    if expected is not None:
        check_specs(header.specs, expected)  # before the buffer is allocated: a header may claim any size
    assembler = Reassembler(header, max_bytes=header.total_bytes if max_bytes is None else max_bytes)
    try:
        for offset, data in chunks:
            assembler.add(offset, data)
        return decode(assembler.finish(), expected=expected)
    finally:
        del assembler  # an error's traceback keeps this frame: free the buffer now, not with the error


def receive_tensor_set(stream: Stream[Any], header: TensorSetHeader, messages: Iterable[Any], *,
                       max_bytes: int | None, expected: Sequence[TensorSpec] | None = None,
                       count: WireBytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one transfer whose head carried `header`, from the messages after the head.

    Raises TensorSetTooLarge over max_bytes (None: the header's own size, for a trusted peer),
    TensorSetError for specs other than `expected`, a message that is not a chunk, chunks out of
    order or past the declared size, a missing end message, a digest mismatch or non-finite values.
    `count` adds message_bytes of every chunk read, also when the transfer fails.
    """
    return _reassemble(header, _chunks(stream, messages, count), max_bytes=max_bytes, expected=expected)


async def collect_tensor_set(stream: Stream[Any], header: TensorSetHeader, read: Callable[[], Awaitable[Any]], *,
                             max_bytes: int, expected: Sequence[TensorSpec] | None = None,
                             count: WireBytes | None = None) -> EncodedTensorSet:
    """receive_tensor_set for a coroutine (the coordinator's SubmitUpdate): the messages come from
    `await read()` (None at the stream's end), checked the same way; returns the payload with its
    digest verified, for decode() (O(model): the caller runs it off the event loop)."""
    if expected is not None:
        check_specs(header.specs, expected)
    assembler = Reassembler(header, max_bytes=max_bytes)
    while True:
        msg = await read()
        if msg is None:
            if stream.end is not None:
                raise TensorSetError(f"the {stream.what} stream ended without its end message; the {stream.what} "
                                     "is not counted")
            break
        if stream.end is not None and msg.HasField("end"):
            break
        if not msg.HasField("chunk"):
            raise TensorSetError(stream.not_a_chunk())
        if count is not None:
            count.add(msg)
        assembler.add(*chunk_from_proto(msg.chunk))
    return assembler.finish()


def inline_update(header: pb.UpdateHeader, encoded: EncodedTensorSet | None) -> pb.InlineUpdate | None:
    """The update as one SubmitInlineUpdate message, or None if its payload is over INLINE_UPDATE_MAX_BYTES."""
    if encoded is None:
        return pb.InlineUpdate(header=header)
    if encoded.payload.nbytes > INLINE_UPDATE_MAX_BYTES:
        return None
    full = pb.UpdateHeader()
    full.CopyFrom(header)
    full.tensors.CopyFrom(header_to_proto(encoded.header))
    return pb.InlineUpdate(header=full, payload=bytes(encoded.payload))


def collect_inline_update(update: pb.InlineUpdate, header: TensorSetHeader, *, max_bytes: int) -> EncodedTensorSet:
    """An inline update's payload, checked as a stream's is (size cap, whole, digest)."""
    assembler = Reassembler(header, max_bytes=max_bytes)
    assembler.add(0, update.payload)
    return assembler.finish()


def receive_parameters(messages: Iterator[pb.FetchParametersResponse], *, max_bytes: int | None,
                       expected: Sequence[TensorSpec] | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(version, θ) from a FetchParameters stream; its first message must be the header."""
    first = next(messages, None)
    if first is None or not first.HasField("header"):
        raise TensorSetError("FetchParameters did not start with a header")
    header = header_from_proto(first.header.tensors)
    return first.header.parameter_version, receive_tensor_set(PARAMETERS, header, messages, max_bytes=max_bytes,
                                                              expected=expected)


def receive_inline(parameters: pb.InlineParameters, *, max_bytes: int | None,
                   expected: Sequence[TensorSpec] | None = None) -> dict[str, torch.Tensor]:
    """θ inlined in a WaitForAssignment reply: the whole payload in one piece, checked like a stream."""
    return _reassemble(header_from_proto(parameters.tensors), [(0, parameters.payload)], max_bytes=max_bytes,
                       expected=expected)
