"""Shared pieces of the benchmarks: machine description, results JSON, child processes.

Not a benchmark itself. Every child process a benchmark starts goes through
`Children`, which kills exactly those processes (and their own children, found
by pid with psutil) when the benchmark ends, however it ends.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """CPU count, platform and library versions of the machine the numbers come from."""
    import google.protobuf
    import grpc
    import numpy
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "numpy": numpy.__version__,
        "psutil": psutil.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "code_at_start": git_state(),
        "calibration_at_start": calibrate(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_state() -> dict[str, Any]:
    """HEAD commit and whether files outside benchmarks/ differ from it (the code measured).

    In a snapshot without .git (e.g. `git archive HEAD`), FEDMETA_BENCH_CODE may carry this as JSON.
    """
    if not (ROOT / ".git").exists() and os.environ.get("FEDMETA_BENCH_CODE"):
        return dict(json.loads(os.environ["FEDMETA_BENCH_CODE"]), snapshot=str(ROOT))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # "XY path" lines: not stripped, since X may be a space (" M README.md")
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if line[3:] and not line[3:].startswith("benchmarks/")]
    return {"commit": git("rev-parse", "HEAD").strip(), "subject": git("log", "-1", "--format=%s").strip(),
            "uncommitted_changes_outside_benchmarks": changed}


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with a timestamp and the load average at the end."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": git_state(),
        **data,
    }
    data.setdefault("machine", {})["loadavg_at_end"] = list(os.getloadavg())
    data["machine"]["calibration_at_end"] = calibrate()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    """n, median, mean, p90, min, max of a sample (p90 by the inclusive method)."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    p90 = statistics.quantiles(v, n=10, method="inclusive")[-1] if len(v) > 1 else v[0]
    return {"n": len(v), "median": statistics.median(v), "mean": statistics.fmean(v), "p90": p90,
            "min": v[0], "max": v[-1]}


class Child:
    """A child process whose stdout/stderr lines are collected by background threads."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
                 python: str | None = None) -> None:
        """Run `python args...` (python: this interpreter unless given, e.g. another venv's)."""
        self.args = list(args)
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.started = time.perf_counter()
        self.ended: float | None = None
        # Children import the code of the tree this benchmark lives in (also when that tree is a
        # snapshot outside the editable install's checkout).
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **(env or {})}
        self._log = open(log_path, "w") if log_path is not None else None
        self.proc = subprocess.Popen([python or sys.executable, *self.args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=full_env)
        self.pid = self.proc.pid
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err_lines), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if self._log is not None:
                self._log.write(line)

    def wait_listening(self, timeout_s: float = 120.0) -> int:
        """The port from the child's `listening on HOST:PORT` stdout line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith("listening on "):
                    return int(line.strip().rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode} before listening:\n"
                                   f"{self.output()[-4000:]}")
            time.sleep(0.01)
        raise RuntimeError(f"{self.args} did not print 'listening on' within {timeout_s} s")

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        if self.ended is None:
            self.ended = time.perf_counter()
        for t in self._threads:
            t.join(timeout=5)
        return rc

    @property
    def wall_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def output(self) -> str:
        return "".join(self.lines) + "".join(self.err_lines)


class Children:
    """The processes one benchmark started; `kill_all` ends them and their descendants by pid."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._descendants: dict[int, psutil.Process] = {}

    def start(self, args: Sequence[str], **kwargs: Any) -> Child:
        child = Child(args, **kwargs)
        self.children.append(child)
        return child

    def track(self) -> None:
        """Remember the current descendants of our children (e.g. a coordinator's local clients)."""
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    for p in psutil.Process(child.pid).children(recursive=True):
                        self._descendants.setdefault(p.pid, p)
                except psutil.NoSuchProcess:
                    pass

    def kill_all(self) -> None:
        self.track()
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait()
        for p in self._descendants.values():
            try:
                if p.is_running():  # psutil checks the pid was not reused (create time)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        for child in self.children:
            if child._log is not None and not child._log.closed:
                child._log.close()


def wait_quiet(*, max_busy_pct: float = 25.0, timeout_s: float = 120.0) -> dict[str, Any]:
    """Wait (up to timeout_s) until the machine's CPUs are mostly idle; other work skews timings.

    Returns what was seen, so a result records whether it was taken on a quiet machine.
    """
    start = time.monotonic()
    busy = psutil.cpu_percent(interval=1.0)
    while busy > max_busy_pct and time.monotonic() - start < timeout_s:
        busy = psutil.cpu_percent(interval=1.0)
    return {"busy_pct_before_start": busy, "waited_s": round(time.monotonic() - start, 1),
            "quiet": busy <= max_busy_pct}


class CpuMonitor:
    """CPU seconds the whole machine was busy during a measurement, and how much of it was not ours.

    foreign_cpu_s = machine busy CPU seconds - CPU seconds of this process and its waited-for children.
    On a shared machine a large foreign share means the timings are pessimistic.
    """

    def __init__(self) -> None:
        import resource

        self._resource = resource
        self._t0 = time.monotonic()
        self._sys0 = psutil.cpu_times()
        self._own0 = self._own()

    def _own(self) -> float:
        r = self._resource
        s, c = r.getrusage(r.RUSAGE_SELF), r.getrusage(r.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    @staticmethod
    def _busy(t: Any) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        busy = self._busy(psutil.cpu_times()) - self._busy(self._sys0)
        own = self._own() - self._own0
        cores = os.cpu_count() or 1
        return {"wall_s": round(wall, 2), "machine_busy_cpu_s": round(busy, 2), "own_cpu_s": round(own, 2),
                "foreign_cpu_s": round(max(0.0, busy - own), 2),
                "foreign_share_of_capacity": round(max(0.0, busy - own) / (wall * cores), 3) if wall else 0.0}


def calibrate(reps: int = 15) -> dict[str, float]:
    """Fixed reference workloads, timed at the start and end of a benchmark.

    This machine's speed drifts (a shared VM host: the same work takes up to 2x longer at
    times, with no steal time reported), so results carry these numbers to compare runs.
    """
    import hashlib

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        data = bytes(16 << 20)

        def best(fn: Any) -> float:
            fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        def small_ops() -> None:  # like the sinusoid MLP's work: many tiny kernels
            x = torch.randn(10, 40)
            for _ in range(200):
                x = torch.tanh(x @ a[:40, :40])

        return {"matmul_256_ms": round(1e3 * best(lambda: a @ a), 3),
                "small_ops_200_ms": round(1e3 * best(small_ops), 3),
                "sha256_16mb_ms": round(1e3 * best(lambda: hashlib.sha256(data).digest()), 3)}
    finally:
        torch.set_num_threads(threads)
