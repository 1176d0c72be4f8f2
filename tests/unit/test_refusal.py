"""Refusal reasons: the Python enum is the proto contract; one decorator maps domain errors to status codes."""

from __future__ import annotations

import asyncio

from pathlib import Path

import grpc
import pytest

from fedmeta.common.codec import TensorSetError, TensorSetTooLarge
from fedmeta.common.proto import pb
from fedmeta.common.refusal import REASON_KEY, Reason, reason_from_metadata, reason_metadata
from fedmeta.server.errors import MAX_MESSAGE_CHARS, Rejected, refusal_of, refusals

PROTO = Path(__file__).resolve().parents[2] / "protos" / "fedmeta" / "v1" / "coordinator.proto"


def test_the_reason_enum_is_the_proto_contract() -> None:
    names = {v.name.removeprefix("REFUSAL_REASON_") for v in pb.RefusalReason.DESCRIPTOR.values} - {"UNSPECIFIED"}
    assert names == {r.value for r in Reason} == {r.name for r in Reason}
    assert "fedmeta-reason" in PROTO.read_text()
    assert reason_from_metadata(reason_metadata(Reason.NOT_JOINED)) == Reason.NOT_JOINED
    assert reason_from_metadata(((REASON_KEY, b"WRONG_RUN"),)) == Reason.WRONG_RUN
    assert reason_from_metadata((("other", "NOT_JOINED"),)) is None and reason_from_metadata(None) is None


class FakeContext:
    """What @refusals uses of a grpc.aio.ServicerContext: trailing metadata, then abort (a coroutine that raises)."""

    def __init__(self) -> None:
        self.trailing: tuple = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, metadata) -> None:  # type: ignore[no-untyped-def]
        self.trailing = tuple(metadata)

    async def abort(self, code, message):  # type: ignore[no-untyped-def]
        self.aborted = (code, message)
        raise RuntimeError("aborted")


@pytest.mark.parametrize("error, code, reason", [
    (Rejected(grpc.StatusCode.NOT_FOUND, "x" * 5000, Reason.NOT_JOINED), grpc.StatusCode.NOT_FOUND, Reason.NOT_JOINED),
    (TensorSetTooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_LARGE),
    (TensorSetError("bad digest"), grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_TENSORS),
])
def test_one_decorator_maps_domain_errors_to_status_codes_and_reasons(error, code, reason) -> None:
    class Servicer:
        @refusals
        async def unary(self, request, context):  # type: ignore[no-untyped-def]
            raise error

    context = FakeContext()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(Servicer().unary(None, context))
    assert context.aborted is not None and context.aborted[0] == code
    assert len(context.aborted[1]) <= MAX_MESSAGE_CHARS + 40  # clipped, with a note of how much
    assert reason_from_metadata(context.trailing) == reason
    assert refusal_of(ValueError("not ours")) is None


def test_the_decorator_refuses_a_plain_function() -> None:
    with pytest.raises(TypeError, match="coroutine"):
        refusals(lambda self, request, context: None)


class FakeCall:
    """A refused call as the client sees it: a status code, a message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple = ()) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._metadata


@pytest.mark.parametrize("code, details, reason, step", [
    (grpc.StatusCode.FAILED_PRECONDITION, "unrelated", Reason.WRONG_RUN, "REJOIN"),
    (grpc.StatusCode.NOT_FOUND, "unrelated", Reason.NOT_JOINED, "REJOIN"),
    (grpc.StatusCode.FAILED_PRECONDITION, "call Join again", None, "NEW_WORK"),  # the text never decides
    (grpc.StatusCode.NOT_FOUND, "", None, "REJOIN"),
    (grpc.StatusCode.NOT_FOUND, "call Join", Reason.STALE_VERSION, "NEW_WORK"),
    (grpc.StatusCode.INVALID_ARGUMENT, "call Join", Reason.BAD_WEIGHT, "STOP"),
    (grpc.StatusCode.PERMISSION_DENIED, "call Join", None, "STOP"),
])
def test_the_session_decides_on_the_reason_then_the_code(code, details, reason, step) -> None:
    from fedmeta.client.session import Next, after_refusal

    metadata = reason_metadata(reason) if reason is not None else ()
    assert after_refusal(FakeCall(code, details, metadata))[0] is Next[step]  # type: ignore[arg-type]
