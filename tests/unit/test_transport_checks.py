"""Transport checks that names cannot fool: loopback is decided on addresses, and a client never
sends its token in plaintext beyond loopback unless its operator says --insecure."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedmeta.client.cli import main as client_main
from fedmeta.client.worker import ClientConfig
from fedmeta.common.net import host_of, is_loopback
from fedmeta.server.config import build


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.1.2.3", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["127.attacker.example", "127.0.0.1.nip.io", "localhost.attacker.example",
                                  "127.0.0.1.", "0.0.0.0", "::", "10.0.0.1", "::ffff:10.0.0.1", "192.168.1.5",
                                  "fe80::1", "", "[]", "no-such-host.invalid", "unix:/tmp/socket"])
def test_names_and_addresses_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_a_localhost_name_counts_only_when_every_address_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile resolver (an edited /etc/hosts) that maps localhost to a LAN address as well."""
    real = socket.getaddrinfo

    def resolver(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        if host == "localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 0))]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert not is_loopback("localhost")
    assert is_loopback("127.0.0.1")


def test_host_of_server_addresses() -> None:
    assert host_of("10.0.0.1:50051") == "10.0.0.1"
    assert host_of("[::1]:50051") == "::1"
    assert host_of("coordinator:50051") == "coordinator"
    assert host_of("::1") == "::1"


@pytest.mark.parametrize("host", ["127.attacker.example", "127.0.0.1.nip.io", "0.0.0.0"])
def test_server_refuses_plaintext_on_names_that_look_local(host: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"--host {host}: serving beyond loopback without TLS"):
        build({"host": host, "run_dir": str(tmp_path / "run")})
    assert build({"host": host, "run_dir": str(tmp_path / "run"), "insecure": True}).insecure


def test_client_refuses_to_send_a_token_in_plaintext_beyond_loopback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token.txt"
    token.write_text("secret\n")
    argv = ["--server", "10.0.0.1:50051", "--client-id", "site-a", "--token-file", str(token)]
    with pytest.raises(SystemExit) as exit_:
        client_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("fedmeta-client: error: --token-file: 10.0.0.1 is not a loopback address")
    assert "--tls-ca" in err and "--insecure" in err and "secret" not in err
    for server in ("127.attacker.example:50051", "[fe80::1]:50051"):
        with pytest.raises(ValueError, match="--token-file: .* is not a loopback address"):
            ClientConfig(server=server, client_id="site-a", data_seed=0, token_file=str(token))
    # What is allowed: loopback, TLS, or the operator's explicit --insecure.
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here\n")
    ClientConfig(server="127.0.0.1:50051", client_id="site-a", data_seed=0, token_file=str(token))
    ClientConfig(server="[::1]:50051", client_id="site-a", data_seed=0, token_file=str(token))
    ClientConfig(server="10.0.0.1:50051", client_id="site-a", data_seed=0, token_file=str(token), tls_ca=str(ca))
    ClientConfig(server="10.0.0.1:50051", client_id="site-a", data_seed=0, token_file=str(token), insecure=True)
    ClientConfig(server="10.0.0.1:50051", client_id="site-a", data_seed=0)  # no token: nothing to leak
