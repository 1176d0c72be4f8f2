"""Separate hosts: the coordinator and two clients in their own Linux network namespaces.

Each namespace is a host with one interface on a bridged LAN (a fourth namespace holds the
bridge) and an address from a private range that exists only inside this test. The
coordinator binds its LAN address, not loopback; TLS with client certificates and per-client
tokens are on, as on a real network. Needs root and iproute2 (`ip netns`); skips otherwise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--tasks-per-client", "4", "--eval-tasks-per-client", "5", "--eval-queries", "20", "--poll-timeout-s", "1"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (Debian/Ubuntu: apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"fmprobe-{uuid.uuid4().hex[:6]}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces NAME-lan (a bridge) and one per host, each host with eth0 on the bridge."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = f"10.254.{random.randrange(1, 250)}"
        self.lan = f"fm{self.tag}-lan"
        self.namespaces = [self.lan]
        _ip("netns", "add", self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.lan, "link", "set", "br0", "up")
        _ip("-n", self.lan, "link", "set", "lo", "up")

    def add(self, name: str, host_number: int) -> tuple[str, str]:
        """A host namespace on the LAN; returns (namespace, address)."""
        ns = f"fm{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        port = f"p{host_number}"
        _ip("-n", self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
        address = f"{self.subnet}.{host_number}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, address

    def delete(self) -> None:
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)


class Proc:
    """A process in a namespace; its combined output is collected in the background."""

    def __init__(self, ns: str, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.proc.args!r} still running after {timeout_s} s:\n{self.output()[-4000:]}")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    h = Hosts()
    try:
        yield h
    finally:
        h.delete()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def _run(*args: str) -> None:
    done = subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_coordinator_and_clients_on_separate_hosts_with_tls_and_tokens(hosts: Hosts, procs: list[Proc],
                                                                      tmp_path: Path) -> None:
    coord_ns, coord_ip = hosts.add("coord", 1)
    clients = {"site-1": hosts.add("site1", 11), "site-2": hosts.add("site2", 12)}

    # The README's commands: a CA, a server certificate for the coordinator's address,
    # a certificate and a token per client.
    creds = tmp_path / "credentials"
    _run("-m", "fedmeta.server.certs", "--out", str(creds), "--server-names", coord_ip, "--clients", ",".join(clients))
    _run("-m", "fedmeta.server.auth", "--clients", ",".join(clients), "--tokens-file", str(creds / "tokens.txt"),
         "--out", str(creds / "tokens"))

    # Nothing listens on any loopback: the coordinator binds its LAN address.
    run_dir = tmp_path / "run"
    server = Proc(coord_ns, "-m", "fedmeta.server", "--host", coord_ip, "--port", "50051", "--run-dir", str(run_dir),
                  "--algorithm", "fomaml", "--rounds", "5", "--clients-per-round", "2", "--no-progress",
                  "--tls-cert", str(creds / "server.pem"), "--tls-key", str(creds / "server-key.pem"),
                  "--tls-ca", str(creds / "ca.pem"), "--require-client-cert",
                  "--tokens-file", str(creds / "tokens.txt"), *FAST)
    procs.append(server)
    deadline = time.monotonic() + 60
    while f"listening on {coord_ip}:50051" not in server.output():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the coordinator did not listen on {coord_ip}:50051:\n{server.output()}")
        time.sleep(0.05)
    assert "SERVING PLAINTEXT" not in server.output()

    # A client host reaches the coordinator only over the LAN.
    ns1 = clients["site-1"][0]
    ping = subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c", "1", "-W", "5", coord_ip],
                          check=False, capture_output=True, text=True, timeout=30) if shutil.which("ping") else None
    assert ping is None or ping.returncode == 0, ping.stdout + ping.stderr

    for client_id, (ns, _address) in clients.items():
        procs.append(Proc(ns, "-m", "fedmeta.client", "--server", f"{coord_ip}:50051", "--client-id", client_id,
                          "--threads", "1", "--tls-ca", str(creds / "ca.pem"),
                          "--tls-cert", str(creds / f"client-{client_id}.pem"),
                          "--tls-key", str(creds / f"client-{client_id}-key.pem"),
                          "--token-file", str(creds / "tokens" / f"token-{client_id}.txt")))
    assert server.wait(180) == 0, server.output()[-4000:]
    for p in procs[1:]:
        assert p.wait(60) == 0, p.output()[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fomaml" and summary["rounds_completed"] == 5
    assert summary["clients_seen"] == 2 and sorted(summary["eval"]["per_client"]) == sorted(clients)
    log = server.output()
    assert "loaded 2 client tokens" in log
    for client_id in clients:
        assert f"client {client_id} joined" in log

    # The addresses exist only inside the test: the machine itself has no route into the LAN's interfaces.
    root_addrs = _ip("-4", "-o", "addr", "show").stdout
    assert f" {hosts.subnet}." not in root_addrs
