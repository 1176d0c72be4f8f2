"""docker-compose.yml on a real engine: a coordinator and 3 client containers running FOMAML.

One client container is killed mid-run and the run finishes without it; the coordinator
container is restarted mid-run and resumes from its checkpoint in the named volume. The
TLS variant (docker-compose.tls.yml) runs with certificates from fedmeta-certs and per-client
tokens from fedmeta-tokens. Every container, network and volume is removed afterwards.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.docker.conftest import IMAGE, REQUIRED, ROOT, compose_commands
from tests.integration.conftest import wait_for as _wait_for

wait_for = functools.partial(_wait_for, interval_s=0.5)  # the Docker API is slow to ask

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROUNDS = 400
SMALL = {
    "FEDMETA_SERVER_ALGORITHM": "fomaml",
    "FEDMETA_SERVER_TASKS_PER_CLIENT": "4",
    "FEDMETA_SERVER_EVAL_TASKS_PER_CLIENT": "5",
    "FEDMETA_SERVER_EVAL_QUERIES": "20",
    "FEDMETA_SERVER_POLL_TIMEOUT_S": "1",
    "FEDMETA_SERVER_ROUND_DEADLINE_S": "2",
    "FEDMETA_SERVER_MIN_CLIENTS": "2",
    "FEDMETA_CLIENT_LOG_LEVEL": "debug",  # a line per accepted update
}
UPDATE_LINE = re.compile(r"fedmeta\.client: round (\d+): \d+ tasks, .* ms compute$", re.MULTILINE)


@pytest.fixture(params=["docker compose", "docker-compose"], ids=["compose-v2", "compose-v1"])
def compose(request: pytest.FixtureRequest) -> list[str]:
    """Each test runs under both compose implementations; one that is not installed is skipped."""
    cmd = request.param.split()
    if cmd not in compose_commands():
        if REQUIRED:
            pytest.fail(f"FEDMETA_REQUIRE_DOCKER=1 but `{request.param}` does not run here")
        pytest.skip(f"`{request.param}` is not installed (scripts/compose-smoke.sh installs both)")
    return cmd


def _health(port: int, creds: grpc.ChannelCredentials | None = None, name: str = "localhost") -> str:
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
               if creds else grpc.insecure_channel(target))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _published_port(container: Any) -> int:
    container.reload()
    return int(container.ports["50051/tcp"][0]["HostPort"])


def _healthy(container: Any) -> bool:
    container.reload()
    return container.attrs["State"].get("Health", {}).get("Status") == "healthy"


def _updates(p: Any, container: Any) -> list[int]:
    """Rounds whose update the coordinator accepted from this client container (from its own log)."""
    return [int(r) for r in UPDATE_LINE.findall(p.logs(container))]


def test_compose_three_clients_survive_a_lost_client_and_a_coordinator_restart(project, compose: list[str]) -> None:
    p = project(compose, **SMALL, FEDMETA_SERVER_ROUNDS=str(ROUNDS), FEDMETA_SERVER_CLIENTS_PER_ROUND="2")
    p.run("up", "-d", "--no-build", "--scale", "client=3")
    coordinator = p.coordinator()
    wait_for(lambda: _healthy(coordinator), timeout_s=120, what="the coordinator's health check")
    assert _health(_published_port(coordinator)) == "SERVING"  # the standard health service, from the host
    assert "healthy" in p.run("ps")

    clients = p.containers("client")
    assert len(clients) == 3 and len({c.id for c in clients}) == 3
    ids = {}
    for c in clients:
        first = wait_for(lambda c=c: re.search(r"--client-id (\S+)", p.logs(c)), timeout_s=60,
                         what=f"{c.name} to start")
        ids[c.id] = first.group(1)
    assert sorted(ids.values()) == ["client-1", "client-2", "client-3"]

    # Every container has had updates accepted before anything is broken.
    wait_for(lambda: all(_updates(p, c) for c in clients), timeout_s=180, what="an accepted update from each client")
    victim = clients[2]
    victim.kill()  # SIGKILL mid-run; a manual kill is not undone by the restart policy
    killed_at = len(p.metrics())
    assert killed_at < ROUNDS, "the run finished before a client could be killed: raise ROUNDS"

    # Rounds go on with the two survivors, then the coordinator container is restarted.
    wait_for(lambda: len(p.metrics()) >= killed_at + 10, timeout_s=120, what="rounds after the kill")
    coordinator.restart(timeout=20)
    restarted_at = len(p.metrics())
    assert restarted_at < ROUNDS, "the run finished before the coordinator restart: raise ROUNDS"

    wait_for(lambda: p.coordinator().status == "exited", timeout_s=300, what="the run to finish")
    coordinator = p.coordinator()
    assert coordinator.attrs["State"]["ExitCode"] == 0, p.logs(coordinator)[-3000:]
    log = p.run("logs", "--no-color", "coordinator")
    resumed = re.search(r"resumed run \S+ from its checkpoint: next round (\d+) of (\d+)", log)
    assert resumed, log[-3000:]
    assert int(resumed.group(1)) >= killed_at + 10 and int(resumed.group(2)) == ROUNDS

    summary = p.summary()
    assert summary is not None, "no summary.json in the run directory"
    assert summary["algorithm"] == "fomaml" and summary["rounds_completed"] == ROUNDS
    assert summary["clients_seen"] == 3
    assert sorted(summary["eval"]["per_client"]) == sorted(ids[c.id] for c in clients[:2])
    records = p.metrics()
    assert [r["round"] for r in records] == list(range(ROUNDS))  # each round once, across the restart

    counts = {ids[c.id]: len(_updates(p, c)) for c in clients}
    assert all(n > 0 for n in counts.values()), counts  # updates from 3 distinct containers
    victim.reload()
    assert victim.status == "exited" and victim.attrs["State"]["ExitCode"] == 137
    assert victim.attrs["RestartCount"] == 0
    for c in clients[:2]:
        wait_for(lambda c=c: c.reload() or c.status == "exited", timeout_s=60, what=f"{c.name} to leave")
        assert c.attrs["State"]["ExitCode"] == 0, p.logs(c)[-2000:]
        assert "the run is finished" in p.logs(c)


def _tool(name: str, module: str) -> list[str]:
    path = shutil.which(name)
    return [path] if path else [sys.executable, "-m", module]


def _listing(container: Any) -> list[str]:
    """Every file under /credentials in a running container, relative and sorted."""
    code = ("import os; print('\\n'.join(sorted(os.path.relpath(os.path.join(d, f), '/credentials') "
            "for d, _, fs in os.walk('/credentials') for f in fs)))")
    result = container.exec_run(["python", "-c", code])
    assert result.exit_code == 0, result.output
    return result.output.decode().split()


def test_compose_tls_variant_with_certificates_and_tokens(project, compose: list[str], tmp_path: Path) -> None:
    """The README's TLS commands: fedmeta-certs, fedmeta-tokens, chown, both compose files; one client
    replica in the compose network and one started with `docker run` outside it, through the published port."""
    creds = tmp_path / "credentials"
    ids = "client-1,site-a"
    for cmd in (
        [*_tool("fedmeta-certs", "fedmeta.server.certs"), "--out", str(creds),
         "--server-names", "coordinator,localhost,127.0.0.1", "--clients", "site-a"],
        [*_tool("fedmeta-tokens", "fedmeta.server.auth"), "--clients", ids, "--tokens-file", str(creds / "tokens.txt"),
         "--out", str(creds / "tokens")],
    ):
        done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "10001:10001", str(creds)], check=True)
    else:  # the images' user (uid 10001) must read the 0600 keys and tokens
        for f in [creds, *creds.rglob("*")]:
            f.chmod(0o755 if f.is_dir() else 0o644)

    p = project(compose, "docker-compose.yml", "docker-compose.tls.yml", **SMALL,
                FEDMETA_SERVER_ROUNDS="5", FEDMETA_SERVER_CLIENTS_PER_ROUND="2", FEDMETA_CREDENTIALS=str(creds))
    p.run("up", "-d", "--no-build", "--scale", "client=1")
    coordinator = p.coordinator()
    wait_for(lambda: _healthy(coordinator), timeout_s=120, what="the coordinator's health check over TLS")
    port = _published_port(coordinator)
    assert _health(port) == "UNAVAILABLE"  # no plaintext on the published port
    tls = grpc.ssl_channel_credentials((creds / "ca.pem").read_bytes())
    assert _health(port, tls) == "SERVING"
    # Each container holds only what it needs: never the CA's key; the coordinator no client token or key,
    # a client no private key. (The coordinator waits for the second client, so both are still running.)
    (replica,) = p.containers("client")
    assert _listing(coordinator) == ["ca.pem", "server-key.pem", "server.pem", "tokens.txt"]
    seen = _listing(replica)
    assert "ca.pem" in seen and "tokens/token-client-1.txt" in seen
    assert not any(name.endswith("-key.pem") for name in seen), seen

    # A client on "another machine": the README's `docker run`, on the host's network, through the published port.
    remote = p.engine.containers.run(
        IMAGE, ["client", "--server", f"127.0.0.1:{port}", "--client-id", "site-a", "--tls-ca", "/creds/ca.pem",
                "--tls-cert", "/creds/client-site-a.pem", "--tls-key", "/creds/client-site-a-key.pem",
                "--token-file", "/creds/tokens/token-site-a.txt", "--log-level", "debug"],
        detach=True, network_mode="host", restart_policy={"Name": "on-failure"},
        volumes={str(creds): {"bind": "/creds", "mode": "ro"}},
        # The project's label, so that its cleanup removes it; a service label of its own (the image
        # built by compose v2 carries com.docker.compose.service=client).
        labels={"com.docker.compose.project": p.name, "com.docker.compose.service": "remote-client"})

    wait_for(lambda: p.coordinator().status == "exited", timeout_s=240, what="the TLS run to finish")
    coordinator = p.coordinator()
    log = p.logs(coordinator)
    assert coordinator.attrs["State"]["ExitCode"] == 0, log[-3000:]
    assert "SERVING PLAINTEXT" not in log and "loaded 2 client tokens" in log
    summary = p.summary()
    assert summary is not None and summary["rounds_completed"] == 5 and summary["clients_seen"] == 2
    assert sorted(summary["eval"]["per_client"]) == ["client-1", "site-a"]
    for c in (replica, remote):
        wait_for(lambda c=c: c.reload() or c.status == "exited", timeout_s=60, what=f"{c.name} to leave")
        assert c.attrs["State"]["ExitCode"] == 0, p.logs(c)[-2000:]
        assert _updates(p, c), p.logs(c)[-2000:]
    assert "--token-file /credentials/tokens/token-client-1.txt" in p.logs(replica)


def test_compose_files_parse_with_the_gpu_profile(project, compose: list[str]) -> None:
    """Every file and profile the README shows is valid for this compose implementation."""
    p = project(compose, "docker-compose.yml", "docker-compose.tls.yml", FEDMETA_CREDENTIALS="/nonexistent")
    text = p.run("--profile", "gpu", "config")
    for needle in ("client-gpu", "driver: nvidia", "capabilities:", "FEDMETA_CLIENT_DEVICE: cuda",
                   "condition: service_healthy", "/credentials/tokens/token-{client_id}.txt"):
        assert needle in text, needle
