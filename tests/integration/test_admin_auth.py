"""The Admin service is the operator's alone: raw stubs with no token, a wrong token, a federation
client's token or certificate are refused; without an admin credential it is not served at all."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedmeta.common import CLIENT_ID_METADATA
from fedmeta.common.proto import admin_pb, admin_pb_grpc, pb, pb_grpc
from fedmeta.server.auth import issue_tokens
from fedmeta.server.certs import generate
from fedmeta.server.config import build

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "a" * 8 + "0123456789abcdef" * 4


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    issue_tokens(["alice"], tmp_path / "tokens.txt", tmp_path / "out")
    return tmp_path


def _refused(call, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_admin_refuses_clients_tokens_wrong_tokens_and_unauthenticated_calls(inprocess_server, secrets_dir: Path) -> None:
    s = inprocess_server(tokens_file=str(secrets_dir / "tokens.txt"), admin_token_file=str(secrets_dir / "admin.token"))
    admin = admin_pb_grpc.AdminStub(s.channel)
    alice_token = (secrets_dir / "out" / "token-alice.txt").read_text().strip()
    as_alice = ((CLIENT_ID_METADATA, "alice"), ("authorization", f"Bearer {alice_token}"))
    # alice's token is good for the Coordinator service ...
    assert pb_grpc.CoordinatorStub(s.channel).Join(pb.JoinRequest(client_id="alice", protocol_version=1),
                                                   metadata=as_alice, timeout=10).config.run_id
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    # ... and for nothing on the Admin service, read or write
    assert "wrong admin token" in _refused(lambda: admin.GetStatus(admin_pb.GetStatusRequest(), metadata=as_alice,
                                                                   timeout=10), unauthenticated)
    _refused(lambda: admin.Pause(admin_pb.PauseRequest(), metadata=as_alice, timeout=10), unauthenticated)
    assert "no admin token" in _refused(lambda: admin.GetStatus(admin_pb.GetStatusRequest(), timeout=10),
                                        unauthenticated)
    _refused(lambda: admin.StopAfterRound(admin_pb.StopAfterRoundRequest(), timeout=10), unauthenticated)
    wrong = (("authorization", "Bearer " + ADMIN_TOKEN[:-1] + "b"),)
    _refused(lambda: admin.RevokeClient(admin_pb.RevokeClientRequest(client_id="alice"), metadata=wrong, timeout=10),
             unauthenticated)
    assert not s.coordinator.steering.paused and not s.coordinator.steering.stop_requested
    assert "alice" not in s.coordinator.registry.revoked
    ok = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    status = admin.GetStatus(admin_pb.GetStatusRequest(), metadata=ok, timeout=10)
    assert [c.client_id for c in status.clients] == ["alice"] and status.run.run_id == s.coordinator.run.run_id
    # A bad value is refused like its flag, and the refusal is recorded too.
    detail = _refused(lambda: admin.SetRoundDeadline(admin_pb.SetRoundDeadlineRequest(round_deadline_s=0.0),
                                                     metadata=ok, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
    assert "--round-deadline-s" in detail
    assert "refused" in (Path(s.coordinator.config.run_dir) / "admin.jsonl").read_text()


def test_without_an_admin_credential_the_admin_service_is_not_served(inprocess_server) -> None:
    s = inprocess_server()
    admin = admin_pb_grpc.AdminStub(s.channel)
    _refused(lambda: admin.GetStatus(admin_pb.GetStatusRequest(), timeout=10), grpc.StatusCode.UNIMPLEMENTED)
    _refused(lambda: admin.Pause(admin_pb.PauseRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                                 timeout=10), grpc.StatusCode.UNIMPLEMENTED)
    assert not s.coordinator.steering.paused


def test_an_admin_token_equal_to_a_client_token_or_weak_is_refused_at_start(secrets_dir: Path) -> None:
    alice_token = (secrets_dir / "out" / "token-alice.txt").read_text()
    (secrets_dir / "same.token").write_text(alice_token)
    with pytest.raises(ValueError, match="also client 'alice'"):
        build({"tokens_file": str(secrets_dir / "tokens.txt"), "admin_token_file": str(secrets_dir / "same.token"),
               "run_dir": str(secrets_dir / "run")})
    (secrets_dir / "weak.token").write_text("hunter2\n")
    with pytest.raises(ValueError, match="--admin-token-file"):
        build({"admin_token_file": str(secrets_dir / "weak.token"), "run_dir": str(secrets_dir / "run")})
    with pytest.raises(ValueError, match="--dashboard-host 0.0.0.0: a dashboard beyond loopback needs"):
        build({"dashboard_port": 0, "dashboard_host": "0.0.0.0", "run_dir": str(secrets_dir / "run")})


def test_under_mutual_tls_only_the_operators_certificate_is_admin(inprocess_server, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    generate(certs, server_names=["localhost", "127.0.0.1"], clients=["alice", "operator"], days=2)
    s = inprocess_server(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server-key.pem"),
                         tls_ca=str(certs / "ca.pem"), require_client_cert=True, admin_cert_name="operator")

    def channel(who: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(),
                                             (certs / f"client-{who}-key.pem").read_bytes(),
                                             (certs / f"client-{who}.pem").read_bytes())
        return grpc.secure_channel(f"127.0.0.1:{s.port}", creds)

    with channel("alice") as alice, channel("operator") as operator:
        detail = _refused(lambda: admin_pb_grpc.AdminStub(alice).Pause(admin_pb.PauseRequest(), timeout=10),
                          grpc.StatusCode.PERMISSION_DENIED)
        assert "not the operator's" in detail and not s.coordinator.steering.paused
        # The operator's certificate does not make a federation client either.
        detail = _refused(lambda: pb_grpc.CoordinatorStub(operator).Join(
            pb.JoinRequest(client_id="operator", protocol_version=1), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
        assert "--admin-cert-name" in detail
        reply = admin_pb_grpc.AdminStub(operator).Pause(admin_pb.PauseRequest(), timeout=10)
        assert reply.result.startswith("paused") and s.coordinator.steering.paused
