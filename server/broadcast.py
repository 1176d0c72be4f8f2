"""The broadcast θ: its version, its encoded payloads, the streams reading it, and the outer step's buffer.

The version of θ is the SHA-256 of its float32 encoding. The payload for each encoding is
made once per version; the float32 one views θ's memory (no copy). While any
FetchParameters stream reads the payload (`readers`), the outer step works on a copy of θ;
with none it steps in place: O(model) memory either way. From begin_step() until
publish() no stream may start on the old version (STALE_VERSION), so an in-place step
never changes bytes a stream is sending.

Not thread-safe by itself: the Coordinator calls it under its lock.
"""

from __future__ import annotations

import threading

import grpc
import torch

from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.codec import EncodedTensorSet, TensorSetHeader, encode
from fedmeta.common.refusal import Reason
from fedmeta.common.transfer import message_bytes, parameter_messages
from fedmeta.server.errors import Rejected

# A FetchParameters stream as gRPC sends it: each message serialised, with its counted size.
Wire = list[tuple[bytes, int]]


def version_of(layout: FlatLayout, theta: torch.Tensor) -> str:
    """The parameter version of a flat float32 θ: the digest of its float32 encoding."""
    return encode(layout.views(theta)).header.sha256.hex()


class Broadcast:
    """θ as clients see it: one version at a time, encoded for the run's encoding."""

    def __init__(self, layout: FlatLayout, theta: torch.Tensor, *, encoding: str, chunk_bytes: int) -> None:
        self.layout = layout
        self.encoding = encoding
        self.chunk_bytes = chunk_bytes
        self.readers = 0
        self.stepping = False
        self.encoded: dict[str, EncodedTensorSet] = {}
        self.version = ""
        self.publish(theta)

    def publish(self, theta: torch.Tensor) -> None:
        """Make theta the broadcast version and end a step begun with begin_step()."""
        self.theta = theta
        views = self.layout.views(theta)
        plain = encode(views)
        self.encoded = {"float32": plain}
        self.version = plain.header.sha256.hex()
        if self.encoding != "float32":
            self.encoded[self.encoding] = encode(views, encoding=self.encoding)
        self.stepping = False

    def parameters(self) -> dict[str, torch.Tensor]:
        """The current meta-parameters as named views (read-only by convention)."""
        return self.layout.views(self.theta)

    def inline(self, version: str) -> tuple[TensorSetHeader, bytes] | None:
        """A copy of version's encoded parameters if they fit in one chunk (to inline them), else None."""
        encoded = self.encoded[self.encoding]
        if version != self.version or self.stepping or encoded.header.total_bytes > self.chunk_bytes:
            return None
        return encoded.header, bytes(encoded.payload)

    def acquire(self, version: str) -> EncodedTensorSet:
        """The encoded current parameters for a stream, held until release()."""
        if version != self.version or self.stepping:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"parameter version {version[:12]!r} is not current (the current one is "
                           f"{self.version[:12]!r}, or a new one is being made): ask WaitForAssignment "
                           "for new work", Reason.STALE_VERSION)
        self.readers += 1
        return self.encoded[self.encoding]

    def release(self) -> None:
        self.readers -= 1

    def begin_step(self) -> bool:
        """No new reader from here on. Returns whether the step may work on θ in place (no reader);
        else the caller steps a copy (made outside the lock: O(model))."""
        self.stepping = True
        return self.readers == 0


class WireCache:
    """FetchParameters' serialised messages for the current version, made once and shared by
    every stream: a stream then holds no copy of its own, only gRPC's buffer of the message
    being sent (a chunk), and the coordinator serialises θ once per version, not once per
    client (256 clients x 4 MB were 1 GB of protobuf copies a round). Costs one model size.
    Thread-safe; concurrent first readers of a version wait for one of them to build it."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._version = ""
        self._wire: Wire = []

    def messages(self, version: str, encoded: EncodedTensorSet) -> Wire:
        with self._lock:
            if self._version != version:
                self._wire = []  # the old version's messages live on only in the streams sending them
                self._wire = [(m.SerializeToString(), message_bytes(m))
                              for m in parameter_messages(version, encoded, self.chunk_bytes)]
                self._version = version
            return self._wire
