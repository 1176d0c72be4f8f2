"""Revocation fails closed: a tokens file that disappears or turns malformed refuses every call until fixed."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fedmeta.common.proto import pb

pytestmark = pytest.mark.integration


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "fedmeta.server.auth", "--clients", "alice,bob",
                    "--tokens-file", str(tmp_path / "tokens.txt"), "--out", str(tmp_path / "tokens")],
                   check=True, capture_output=True, timeout=60)
    return tmp_path


def test_a_missing_or_malformed_tokens_file_refuses_every_call_until_fixed(
        inprocess_server, tokens: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens_file = tokens / "tokens.txt"
    good_copy = tokens / "tokens.good"
    shutil.copy(tokens_file, good_copy)
    s = inprocess_server(tokens_file=str(tokens_file))
    alice = (tokens / "tokens" / "token-alice.txt").read_text().strip()
    metadata = (("fedmeta-client-id", "alice"), ("authorization", f"Bearer {alice}"))

    def join() -> pb.JoinResponse:
        return s.stub.Join(pb.JoinRequest(client_id="alice", protocol_version=1), timeout=10, metadata=metadata)

    def refused() -> str:
        with pytest.raises(grpc.RpcError) as info:
            join()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert alice not in info.value.details()
        return info.value.details()

    assert join().config.run_id == s.coordinator.run.run_id
    with caplog.at_level(logging.INFO, logger="fedmeta.auth"):
        tokens_file.unlink()  # deleted: no last good set is kept
        assert "tokens file is unusable" in refused()
        assert "tokens file is unusable" in refused()  # and stays refused
        shutil.copy(good_copy, tokens_file)
        assert join().config.run_id == s.coordinator.run.run_id  # fixed: calls pass again
        tokens_file.write_text(good_copy.read_text() + "alice not-hex\n")  # malformed
        os.utime(tokens_file, (1, 1))
        assert "tokens file is unusable" in refused()
        tokens_file.write_text("\x00\xff garbage")
        refused()
        shutil.copy(good_copy, tokens_file)
        os.utime(tokens_file, (2, 2))
        assert join().config.run_id == s.coordinator.run.run_id
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot read" in m for m in errors) and any("line 3" in m for m in errors), errors
    # Logged once per distinct problem, not once per refused call.
    assert len(errors) == 3, errors
    assert all(alice not in r.getMessage() for r in caplog.records)
