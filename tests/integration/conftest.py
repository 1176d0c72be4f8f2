"""Fixtures that start real coordinators and real client processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedmeta.common.proto import pb_grpc
from fedmeta.server.config import build
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.grpc_server import create_server

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], *, timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "condition") -> Any:
    """Poll condition() until it returns something truthy; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class InProcessServer:
    """A real gRPC coordinator on 127.0.0.1 in this process (so tests can inspect theta)."""

    coordinator: Coordinator
    server: grpc.Server
    port: int
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub


@pytest.fixture
def inprocess_server(tmp_path: Path) -> Iterator[Callable[..., InProcessServer]]:
    started: list[InProcessServer] = []

    def start(**settings: Any) -> InProcessServer:
        values = {"run_dir": str(tmp_path / f"run{len(started)}"), "port": 0, "rounds": 3,
                  "poll_timeout_s": 1.0, "round_deadline_s": 5.0} | settings
        config = build(values)
        coordinator = Coordinator(config)
        server, port = create_server(config, coordinator)
        server.start()
        coordinator.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        s = InProcessServer(coordinator, server, port, channel, pb_grpc.CoordinatorStub(channel))
        started.append(s)
        return s

    yield start
    for s in started:
        s.channel.close()
        s.coordinator.stop()
        s.server.stop(grace=None)


@dataclass
class Process:
    """A child process whose combined output is collected in the background."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {self.proc.args!r} still running after {timeout_s} s; output:\n{self.output()[-4000:]}")


def _spawn(args: list[str]) -> Process:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env)
    p = Process(proc)
    threading.Thread(target=p._pump, daemon=True).start()
    return p


@dataclass
class ServerProcess(Process):
    port: int = 0
    run_dir: Path = Path()


@pytest.fixture
def processes() -> Iterator[Any]:
    """Start coordinator and client processes; every one still running is killed at teardown."""
    children: list[Process] = []

    class Factory:
        def server(self, run_dir: Path, *flags: str) -> ServerProcess:
            p = _spawn(["-m", "fedmeta.server", "--port", "0", "--run-dir", str(run_dir), "--poll-timeout-s", "1",
                        "--no-progress", *flags])
            sp = ServerProcess(p.proc, p.lines, run_dir=run_dir)
            children.append(p)

            def listening() -> int | None:
                for line in p.lines:
                    if line.startswith("listening on "):
                        return int(line.rsplit(":", 1)[1])
                if p.proc.poll() is not None:
                    pytest.fail(f"coordinator exited with {p.proc.returncode}:\n{p.output()}")
                return None

            sp.port = wait_for(listening, timeout_s=60, what="the coordinator to listen")
            return sp

        def client(self, port: int, client_id: str, data_seed: int, *flags: str) -> Process:
            p = _spawn(["-m", "fedmeta.client", "--server", f"127.0.0.1:{port}", "--client-id", client_id,
                        "--data-seed", str(data_seed), "--threads", "1", *flags])
            children.append(p)
            return p

    yield Factory()
    for p in children:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait()
