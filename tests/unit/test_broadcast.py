"""The broadcast θ (server/broadcast.py): versions, encodings, readers, the in-place step."""

from __future__ import annotations

import pytest
import torch

from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.codec import encode
from fedmeta.common.refusal import Reason
from fedmeta.server.broadcast import Broadcast, version_of
from fedmeta.server.errors import Rejected


def rejected(call) -> Rejected:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as info:
        call()
    return info.value


def test_broadcast_versions_readers_and_the_in_place_step() -> None:
    layout = FlatLayout.of({"w": torch.zeros(3), "b": torch.zeros(1)})
    theta = torch.arange(4, dtype=torch.float32)
    b = Broadcast(layout, theta, encoding="float16", chunk_bytes=1 << 20)
    assert b.version == version_of(layout, theta) == encode(layout.views(theta)).header.sha256.hex()
    assert set(b.encoded) == {"float32", "float16"}
    assert b.inline(b.version) is not None and b.inline("old") is None
    assert rejected(lambda: b.acquire("old")).reason == Reason.STALE_VERSION
    b.acquire(b.version)
    assert b.begin_step() is False  # a reader: step a copy
    assert rejected(lambda: b.acquire(b.version)).reason == Reason.STALE_VERSION  # none start while stepping
    assert b.inline(b.version) is None
    b.release()
    b.publish(theta + 1)
    assert b.version != version_of(layout, theta) and not b.stepping and b.begin_step() is True
