"""Transport security with real processes: TLS, mutual TLS with client ids bound to certificates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fedmeta.common.proto import pb, pb_grpc

pytestmark = pytest.mark.integration

FAST = ["--tasks-per-client", "4", "--eval-tasks-per-client", "5", "--eval-queries", "20"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    done = subprocess.run([sys.executable, "-m", "fedmeta.server.certs", "--out", str(out), "--clients", "alice,bob"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "client-alice.pem").exists() and oct((out / "client-alice-key.pem").stat().st_mode)[-3:] == "600"
    return out


def _mtls_flags(certs: Path) -> list[str]:
    return ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem"),
            "--tls-ca", str(certs / "ca.pem"), "--require-client-cert"]


def _client_flags(certs: Path, who: str) -> list[str]:
    return ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / f"client-{who}.pem"),
            "--tls-key", str(certs / f"client-{who}-key.pem")]


def test_mutual_tls_run_completes(processes, tmp_path: Path, certs: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "3", "--clients-per-round", "2", *_mtls_flags(certs), *FAST)
    clients = [processes.client(server.port, who, i, *_client_flags(certs, who)) for i, who in enumerate(["alice", "bob"])]
    assert server.wait(120) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["clients_seen"] == 2


def test_identity_must_match_certificate_and_plaintext_is_refused(inprocess_server, certs: Path) -> None:
    s = inprocess_server(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server-key.pem"),
                         tls_ca=str(certs / "ca.pem"), require_client_cert=True)

    def channel(who: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(),
                                             (certs / f"client-{who}-key.pem").read_bytes(),
                                             (certs / f"client-{who}.pem").read_bytes())
        return grpc.secure_channel(f"127.0.0.1:{s.port}", creds)

    with channel("bob") as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(pb.JoinRequest(client_id="alice", protocol_version=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not match the client certificate" in info.value.details()
        reply = stub.Join(pb.JoinRequest(client_id="bob", protocol_version=1), timeout=10)
        assert reply.config.run_id == s.coordinator.run.run_id
    # The in-process fixture's own channel is plaintext: a TLS server never answers it.
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Join(pb.JoinRequest(client_id="alice", protocol_version=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "alice" not in s.coordinator._clients


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0: serving beyond loopback without TLS"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], "--tls-cert: no such file"),
        (["--require-client-cert"], "--require-client-cert: needs --tls-ca"),
    ],
)
def test_unsafe_or_incomplete_transport_settings_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fedmeta.server", "--run-dir", str(tmp_path / "run"), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "fedmeta.server.auth", "--clients", "alice,bob",
                           "--tokens-file", str(tmp_path / "tokens.txt"), "--out", str(tmp_path / "tokens")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = (tmp_path / "tokens" / "token-alice.txt").read_text().strip()
    assert token not in (tmp_path / "tokens.txt").read_text()  # only salted hashes on the server
    return tmp_path


def test_token_run_completes_and_tokens_never_reach_the_log(processes, tmp_path: Path, tokens: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "3", "--clients-per-round", "2",
                              "--tokens-file", str(tokens / "tokens.txt"), *FAST)
    clients = [processes.client(server.port, who, i, "--token-file", str(tokens / "tokens" / f"token-{who}.txt"))
               for i, who in enumerate(["alice", "bob"])]
    assert server.wait(120) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    for who in ("alice", "bob"):
        token = (tokens / "tokens" / f"token-{who}.txt").read_text().strip()
        logs = server.output() + "".join(c.output() for c in clients) + (run_dir / "config.json").read_text()
        assert token not in logs


def test_missing_wrong_and_revoked_tokens_are_unauthenticated(inprocess_server, tokens: Path) -> None:
    tokens_file = tokens / "tokens.txt"
    s = inprocess_server(tokens_file=str(tokens_file))
    alice = (tokens / "tokens" / "token-alice.txt").read_text().strip()
    join = pb.JoinRequest(client_id="alice", protocol_version=1)

    def call(metadata: tuple[tuple[str, str], ...], request: pb.JoinRequest = join) -> pb.JoinResponse:
        return s.stub.Join(request, timeout=10, metadata=metadata)

    for metadata in [(), (("fedmeta-client-id", "alice"), ("authorization", "Bearer " + "0" * 64)),
                     (("fedmeta-client-id", "bob"), ("authorization", f"Bearer {alice}")),
                     (("fedmeta-client-id", "mallory"), ("authorization", f"Bearer {alice}"))]:
        with pytest.raises(grpc.RpcError) as info:
            call(metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert alice not in info.value.details()
    good = (("fedmeta-client-id", "alice"), ("authorization", f"Bearer {alice}"))
    assert call(good).config.run_id == s.coordinator.run.run_id
    # A valid token for alice cannot act as bob.
    with pytest.raises(grpc.RpcError) as info:
        call(good, pb.JoinRequest(client_id="bob", protocol_version=1))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The one-message update is behind the token too, and its header's client id must be the token's.
    inline = pb.InlineUpdate(header=pb.UpdateHeader(run_id=s.coordinator.run.run_id, client_id="bob"))
    for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED), (good, grpc.StatusCode.PERMISSION_DENIED)]:
        with pytest.raises(grpc.RpcError) as info:
            s.stub.SubmitInlineUpdate(inline, timeout=10, metadata=metadata)
        assert info.value.code() == code, info.value.details()
    # Revocation: drop alice's line; her next call is refused.
    lines = [line for line in tokens_file.read_text().splitlines() if not line.startswith("alice ")]
    tokens_file.write_text("\n".join(lines) + "\n")
    import os
    os.utime(tokens_file, (1, 1))  # a distinct mtime even within the same clock tick
    with pytest.raises(grpc.RpcError) as info:
        call(good)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_tokens_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.txt"
    bad.write_text("alice nothex 00\n")
    done = subprocess.run([sys.executable, "-m", "fedmeta.server", "--run-dir", str(tmp_path / "run"), "--tokens-file", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--tokens-file" in done.stderr and "line 1" in done.stderr
