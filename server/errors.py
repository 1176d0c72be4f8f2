"""Refusals as domain errors, and the one place that turns them into gRPC status codes.

The coordinator's parts raise Rejected(code, message, reason); the codec raises
TensorSetError (INVALID_ARGUMENT, BAD_TENSORS) and TensorSetTooLarge (RESOURCE_EXHAUSTED,
TOO_LARGE). `refusals` wraps an async servicer method and aborts the call
with the code, the message clipped to MAX_MESSAGE_CHARS, and the reason as the trailing
metadata entry `fedmeta-reason` (common/refusal.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from fedmeta.common.codec import TensorSetError, TensorSetTooLarge
from fedmeta.common.refusal import Reason, reason_metadata
from fedmeta.common.textsafe import clip

# A refusal's message, as logged and as returned to the peer, is at most about this long.
MAX_MESSAGE_CHARS = 1000

F = TypeVar("F", bound=Callable[..., Any])


class Rejected(Exception):
    """A request refused with a gRPC status code, a sentence a person can act on, and a reason a program acts on."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason | None = None, *,
                 identity: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.identity = identity  # the caller's client id itself was refused: not counted against that id


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    reason: Reason | None


def refusal_of(exc: BaseException) -> Refusal | None:
    """The status code, message and reason for a domain error; None for anything else."""
    if isinstance(exc, Rejected):
        return Refusal(exc.code, clip(exc.message, MAX_MESSAGE_CHARS), exc.reason)
    if isinstance(exc, TensorSetTooLarge):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, clip(exc, MAX_MESSAGE_CHARS), Reason.TOO_LARGE)
    if isinstance(exc, TensorSetError):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, clip(exc, MAX_MESSAGE_CHARS), Reason.BAD_TENSORS)
    return None


async def abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> NoReturn:
    if refusal.reason is not None:
        context.set_trailing_metadata(reason_metadata(refusal.reason))
    await context.abort(refusal.code, refusal.message)
    raise AssertionError("unreachable")  # context.abort raises


async def _refuse(servicer: Any, request: Any, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Count the refusal (servicer.note_refusal, if it has one), then abort the call with it."""
    refusal = refusal_of(exc)
    assert refusal is not None
    note = getattr(servicer, "note_refusal", None)
    client_id = getattr(request, "client_id", None)  # None: a request stream (SubmitUpdate counts its own)
    if note is not None and isinstance(client_id, str) and not getattr(exc, "counted", False):
        note("" if getattr(exc, "identity", False) else client_id, refusal.code, refusal.message, refusal.reason)
    await abort(context, refusal)


def refusals(method: F) -> F:
    """Decorator of an async servicer method: Rejected / TensorSetError -> context.abort(code, message) + reason."""
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"{method.__qualname__}: refusals wraps coroutine methods (the service runs on grpc.aio)")

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except (Rejected, TensorSetError) as exc:
            await _refuse(self, request, context, exc)
    return call  # type: ignore[return-value]
