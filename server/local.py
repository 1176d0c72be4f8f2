"""Client processes on this machine for `fedmeta-server --local-clients N`.

They are ordinary `python -m fedmeta.client` processes (exec'd, never forked after gRPC
started) talking to the coordinator over 127.0.0.1, exactly as remote clients do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def local_client_id(index: int) -> str:
    return f"local-{index}"


def devices(spec: str, count: int) -> list[str]:
    """The --device of each of count local clients: spec itself, or for cuda:all GPU i mod the visible GPUs."""
    if spec != "cuda:all":
        return [spec] * count
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ValueError("--local-device cuda:all: no CUDA device is visible to this process")
    return [f"cuda:{i % gpus}" for i in range(count)]


def spawn(
    count: int, port: int, logs_dir: Path, *, tls_ca: str | None = None, data_dir: str | None = None,
    device: str = "cpu", log_format: str = "text",
) -> list[subprocess.Popen[bytes]]:
    """Start count clients with data seeds and shards 0..count-1; each logs to logs_dir/client-local-<i>.log."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // count)
    procs = []
    per_client = devices(device, count)
    for i in range(count):
        client_id = local_client_id(i)
        cmd = [sys.executable, "-m", "fedmeta.client", "--server", f"127.0.0.1:{port}", "--client-id", client_id,
               "--data-seed", str(i), "--threads", str(threads)]
        if per_client[i] != "cpu":
            cmd += ["--device", per_client[i]]
        if log_format != "text":
            cmd += ["--log-format", log_format]
        if tls_ca is not None:
            cmd += ["--tls-ca", tls_ca]
        if data_dir is not None:
            cmd += ["--data-dir", str(Path(data_dir).resolve())]
        with open(logs_dir / f"client-{client_id}.log", "ab") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs


def stop(procs: list[subprocess.Popen[bytes]], *, timeout_s: float = 10.0) -> None:
    """Wait for clients to exit; SIGTERM the ones still running after timeout_s, then SIGKILL."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def last_error(logs_dir: Path, index: int) -> str:
    """The last line of a local client's log, to quote when it failed."""
    path = logs_dir / f"client-{local_client_id(index)}.log"
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
