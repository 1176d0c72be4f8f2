"""Fixtures for tests that drive the compose files on a real Docker engine.

They need an engine, the image the compose files name (FEDMETA_IMAGE, default fedmeta:cpu) and a
compose implementation; scripts/compose-smoke.sh prepares all three. Without them the tests
skip, unless FEDMETA_REQUIRE_DOCKER=1 (set by the smoke script), which turns a skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("FEDMETA_IMAGE", "fedmeta:cpu")
REQUIRED = os.environ.get("FEDMETA_REQUIRE_DOCKER", "") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"FEDMETA_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(f"{reason} (scripts/compose-smoke.sh prepares the engine and the image)")


def compose_commands() -> list[list[str]]:
    """The compose implementations on this machine: ["docker", "compose"] (v2) and ["docker-compose"] (v1)."""
    found = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        try:
            done = subprocess.run([*cmd, "version"], check=False, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            found.append(cmd)
    return found


@pytest.fixture(scope="session")
def engine() -> Any:
    try:
        import docker
    except ImportError:
        docker = None
    if not hasattr(docker, "from_env"):  # (the repository's docker/ folder is no package)
        _unavailable("the docker package (Docker SDK for Python) is not installed")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the engine means "no engine"
        _unavailable(f"no Docker engine answers ({type(exc).__name__}: {exc})")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"the image {IMAGE} is not built")
    return client


@dataclass
class Project:
    """One compose project (its own containers, network and volumes), torn down with `down -v`."""

    engine: Any
    compose: list[str]
    files: list[str]
    name: str
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout_s: float = 180) -> str:
        cmd = [*self.compose, "-p", self.name, *(a for f in self.files for a in ("-f", f)), *args]
        done = subprocess.run(cmd, check=False, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        self.log.append(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            pytest.fail(f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def containers(self, service: str) -> list[Any]:
        """The service's containers (running or not), ordered by their compose number."""
        found = self.engine.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.name}", f"com.docker.compose.service={service}"]})
        return sorted(found, key=lambda c: int(c.labels.get("com.docker.compose.container-number", "0")))

    def coordinator(self) -> Any:
        (c,) = self.containers("coordinator")
        c.reload()
        return c

    def read_file(self, container: Any, path: str) -> str | None:
        """A file from a container's filesystem (running or exited), or None if it is not there."""
        import docker

        try:
            stream, _ = container.get_archive(path)
        except docker.errors.NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            assert member is not None
            f = tar.extractfile(member)
            assert f is not None
            return f.read().decode()

    def metrics(self) -> list[dict[str, Any]]:
        text = self.read_file(self.coordinator(), "/runs/run/metrics.jsonl") or ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def summary(self) -> dict[str, Any] | None:
        text = self.read_file(self.coordinator(), "/runs/run/summary.json")
        return json.loads(text) if text else None

    def logs(self, container: Any) -> str:
        return container.logs().decode(errors="replace")

    def cleanup(self) -> None:
        """`down -v`, then remove whatever still carries the project's label."""
        try:
            self.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout_s=120)
        finally:
            label = f"com.docker.compose.project={self.name}"
            for c in self.engine.containers.list(all=True, filters={"label": label}):
                c.remove(force=True, v=True)
            for n in self.engine.networks.list(filters={"label": label}):
                n.remove()
            for v in self.engine.volumes.list(filters={"label": label}):
                v.remove(force=True)


@pytest.fixture
def project(engine: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Project]]:
    made: list[Project] = []

    def make(compose: list[str], *files: str, **settings: str) -> Project:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMETA_")}
        env |= {"FEDMETA_IMAGE": IMAGE, "FEDMETA_PUBLISH": "127.0.0.1:"} | settings  # an ephemeral host port
        p = Project(engine, compose, list(files) or ["docker-compose.yml"], f"fedmeta-test-{uuid.uuid4().hex[:8]}", env)
        made.append(p)
        return p

    yield make
    for p in made:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for service in ("coordinator", "client"):
                for c in p.containers(service):
                    print(f"----- {c.name} ({c.status}) -----\n{p.logs(c)[-6000:]}")
            print("\n".join(p.log)[-6000:])
        p.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
