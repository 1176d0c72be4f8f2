"""Property-based fuzzing of a live coordinator: random bytes as RPC messages never crash it, never hang, never change theta."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_hostile import assert_still_accepts, snapshot, start

pytestmark = pytest.mark.integration

ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def test_random_messages_never_crash_hang_or_touch_theta(inprocess_server) -> None:
    s = start(inprocess_server)
    before = snapshot(s)
    channel = s.server.channel
    raw = {name: channel.unary_unary(f"/fedmeta.v1.Coordinator/{name}") for name in ("Join", "WaitForAssignment", "Leave")}
    submit = channel.stream_unary("/fedmeta.v1.Coordinator/SubmitUpdate")
    fetch = channel.unary_stream("/fedmeta.v1.Coordinator/FetchParameters")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["Join", "WaitForAssignment", "Leave", "SubmitUpdate", "FetchParameters"]),
           st.lists(st.binary(max_size=200), min_size=0, max_size=5))
    def fuzz(method: str, messages: list[bytes]) -> None:
        try:
            if method == "SubmitUpdate":
                submit(iter(messages), timeout=5)
            elif method == "FetchParameters":
                list(fetch(messages[0] if messages else b"", timeout=5))
            else:
                raw[method](messages[0] if messages else b"", timeout=5)
        except grpc.RpcError as err:
            # An answer (never a hang): unparseable bytes are INTERNAL from grpc itself.
            assert err.code() in ANSWERS, (method, err.code(), err.details())
        with s.coordinator._cond:
            assert s.coordinator.version == before.version
        for name, value in before.theta.items():
            assert torch.equal(s.coordinator.parameters()[name], value)

    fuzz()
    assert_still_accepts(s, before)
