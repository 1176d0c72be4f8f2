"""docker/entrypoint.py and docker/healthcheck.py without Docker: environment variables to flags, client ids."""

from __future__ import annotations

import importlib.util
import socket
import struct
import threading
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = _load("fedmeta_entrypoint", ROOT / "docker" / "entrypoint.py")
healthcheck = _load("fedmeta_healthcheck", ROOT / "docker" / "healthcheck.py")


def test_server_flags_from_environment_and_switches() -> None:
    env = {"FEDMETA_SERVER_ROUNDS": "20", "FEDMETA_SERVER_INSECURE": "1", "FEDMETA_SERVER_NO_PROGRESS": "false",
           "FEDMETA_SERVER_CLIENTS_PER_ROUND": "3", "FEDMETA_SERVER_SEED": "", "FEDMETA_CLIENT_DEVICE": "cuda",
           "PATH": "/bin"}
    argv = entrypoint.server_argv(env, ["--rounds", "30"])
    assert argv == ["--clients-per-round", "3", "--insecure", "--rounds", "20", "--rounds", "30"]
    from fedmeta.server.cli import build_parser

    args = build_parser().parse_args(argv)  # the server's own parser accepts them; the last --rounds wins
    assert args.rounds == "30" and args.insecure is True and args.clients_per_round == "3"


def test_a_switch_with_a_value_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(SystemExit, match="FEDMETA_SERVER_INSECURE: --insecure is a switch"):
        entrypoint.server_argv({"FEDMETA_SERVER_INSECURE": "sometimes"}, [])


def test_client_id_from_replica_number_and_substitution() -> None:
    env = {"FEDMETA_CLIENT_SERVER": "coordinator:50051", "FEDMETA_CLIENT_ID_PREFIX": "gpu",
           "FEDMETA_CLIENT_TOKEN_FILE": "/credentials/tokens/token-{client_id}.txt", "FEDMETA_CLIENT_NO_VMAP": "yes"}
    argv = entrypoint.client_argv(env, [], number=lambda: 3)
    assert argv[:2] == ["--client-id", "gpu-3"]
    assert "/credentials/tokens/token-gpu-3.txt" in argv and "--no-vmap" in argv
    assert "--id-prefix" not in argv
    from fedmeta.client.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.client_id == "gpu-3" and args.server == "coordinator:50051" and args.vmap is False


def test_client_id_order_explicit_then_replica_then_hostname() -> None:
    assert entrypoint.client_id({"FEDMETA_CLIENT_ID": "site-a"}, number=lambda: 2) == "site-a"
    assert entrypoint.client_id({}, number=lambda: 2) == "client-2"
    assert entrypoint.client_id({}, number=lambda: None) == socket.gethostname()
    argv = entrypoint.client_argv({}, ["--client-id", "site-b", "--server", "h:1"], number=lambda: 7)
    assert argv[:2] == ["--client-id", "site-b"]


@pytest.mark.parametrize("name,number", [("fedmeta-client-3.fedmeta_default", 3), ("proj_client_12.proj_default", 12),
                                         ("coordinator.net", None)])
def test_replica_number_from_docker_dns(monkeypatch: pytest.MonkeyPatch, name: str, number: int | None) -> None:
    monkeypatch.setattr(entrypoint, "_ptr_query", lambda ip, **kw: name)
    monkeypatch.setattr(entrypoint.socket, "gethostbyname", lambda host: "172.18.0.5")
    assert entrypoint.replica_number() == number


def test_ptr_query_parses_a_dns_answer() -> None:
    """A tiny DNS server on 127.0.0.1 answers the PTR query the way Docker's embedded DNS does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve() -> None:
        query, peer = sock.recvfrom(512)
        question = query[12:]
        name = b"".join(bytes([len(p)]) + p for p in b"proj-client-4.proj_default".split(b".")) + b"\0"
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 12, 1, 600, len(name)) + name
        sock.sendto(query[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0) + question + answer, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    port = sock.getsockname()[1]
    real_sendto = socket.socket.sendto

    class Redirect(socket.socket):
        def sendto(self, data, address):  # type: ignore[override]
            return real_sendto(self, data, ("127.0.0.1", port))

    try:
        original, entrypoint.socket.socket = entrypoint.socket.socket, Redirect  # type: ignore[misc]
        assert entrypoint._ptr_query("172.18.0.5") == "proj-client-4.proj_default"
    finally:
        entrypoint.socket.socket = original  # type: ignore[misc]
        t.join(5)
        sock.close()


def test_healthcheck_reports_serving_and_unreachable(tmp_path: Path) -> None:
    from fedmeta.server.config import build
    from fedmeta.server.coordinator import Coordinator
    from fedmeta.server.grpc_server import create_server

    config = build({"run_dir": str(tmp_path / "run"), "port": 0, "rounds": 3})
    server, port = create_server(config, Coordinator(config))
    server.start()
    try:
        ok, text = healthcheck.check({"FEDMETA_SERVER_PORT": str(port)})
        assert ok and text.endswith("SERVING")
    finally:
        server.stop(grace=None).wait()
    ok, text = healthcheck.check({"FEDMETA_SERVER_PORT": str(port)})
    assert not ok and "UNAVAILABLE" in text
