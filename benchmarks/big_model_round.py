"""Rounds with an ~11M-parameter (43.6 MB float32) model: seconds per round and the coordinator's peak RSS.

A coordinator process (benchmarks/_big_coordinator.py: Reptile, MLP 1-3300-3300-1, 4 clients per
round, no per-round checkpoint) and 4 client processes (benchmarks/_echo_client.py: the real
Worker, whose train() fetches theta and submits a zero delta of the same shapes), all on
127.0.0.1. Each round moves 43.6 MB down and 43.6 MB up per client (349 MB per round in all).

Round time: round_s from metrics.jsonl, round 0 excluded (it waits for the clients' first
fetch after their start-up); the last training round also writes the final checkpoint
(43.6 MB + fsync), so it is reported on its own too.
Peak RSS of the coordinator: psutil polled every --poll-ms from this process, and the
kernel's ru_maxrss for that one child (os.wait4 on its pid) after it exits.

Goal: <= 0.8 s per round and <= 400 MB (Flower 1.41's gRPC API: 3.9 s and 2.0 GB for the
same exchange on this machine type).

    python benchmarks/big_model_round.py                                    # uploads 2 (default), 1, 4
    python benchmarks/big_model_round.py --rounds 6 --uploads 2             # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Children, CpuMonitor, machine, summary_stats, wait_quiet, write_result  # noqa: E402

NAME = "big_model_round"
GOAL_ROUND_S = 0.8
GOAL_RSS_MB = 400.0
MB = 1e6
HERE = Path(__file__).resolve().parent


class RssPoller:
    """Polls one process's RSS in a thread; keeps the peak and a coarse timeline."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self.timeline: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_logged = -1.0
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self.samples += 1
            self.peak = max(self.peak, rss)
            now = time.monotonic() - self._t0
            if now - last_logged >= 0.25:
                self.timeline.append((round(now, 2), round(rss / MB, 1)))
                last_logged = now
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _rounds_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _cpu(pids: list[int]) -> list[float] | None:
    try:
        return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]
    except psutil.Error:
        return None


def reap(child: Any, timeout_s: float, on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wait for one child with os.wait4 (its own rusage, not the max over all children); on_poll runs meanwhile.

    Returns its exit code, ru_maxrss in MB and CPU seconds (user + system).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if on_poll is not None:
            on_poll()
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid == child.pid:
            child.proc.returncode = os.waitstatus_to_exitcode(status)
            child.ended = time.perf_counter()
            return {"returncode": child.proc.returncode, "ru_maxrss_mb": usage.ru_maxrss * 1024 / MB,
                    "cpu_s": usage.ru_utime + usage.ru_stime}
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.args[0]} still running after {timeout_s} s:\n{child.output()[-4000:]}")
        time.sleep(0.02)


def wait4(child: Any, timeout_s: float, *, run_dir: Path, rounds: int, pids: list[int],
          snaps: list[tuple[int, float, list[float]]]) -> dict[str, Any]:
    """Reap the coordinator (see reap); meanwhile snapshot the CPU time of pids after round 0 and before the last round."""
    marks = (1, max(2, rounds - 1))

    def snapshot() -> None:
        if len(snaps) < 2 and _rounds_done(run_dir) >= marks[len(snaps)]:
            cpu = _cpu(pids)
            if cpu is not None:
                snaps.append((_rounds_done(run_dir), time.monotonic(), cpu))

    return reap(child, timeout_s, snapshot)


def one_run(uploads: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    children = Children()
    run_dir = tmp / f"uploads{uploads}"
    try:
        coordinator = children.start([str(HERE / "_big_coordinator.py"), "--rounds", str(args.rounds),
                                      "--run-dir", str(run_dir), "--hidden", str(args.hidden),
                                      "--max-concurrent-uploads", str(uploads), "--encoding", args.encoding,
                                      "--threads", str(args.coordinator_threads)],
                                     env=dict(kv.split("=", 1) for kv in args.coordinator_env))
        poller = RssPoller(coordinator.pid, args.poll_ms / 1e3)
        port = coordinator.wait_listening()
        clients = [children.start([str(HERE / "_echo_client.py"), "--server", f"127.0.0.1:{port}",
                                   "--client-id", f"echo-{i}", *(["--flat"] if args.flat else [])])
                   for i in range(4)]
        snaps: list[tuple[int, float, list[float]]] = []
        reaped = wait4(coordinator, args.timeout_s, run_dir=run_dir, rounds=args.rounds,
                       pids=[coordinator.pid, *(c.pid for c in clients)], snaps=snaps)
        poller.stop()
        for c in clients:
            c.wait(30)
        if reaped["returncode"] != 0:
            raise RuntimeError(f"coordinator exited {reaped['returncode']}:\n{coordinator.output()[-4000:]}")
        for t in coordinator._threads:
            t.join(timeout=5)
        own = json.loads(coordinator.lines[-1])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        client_timings = [json.loads(c.lines[-1])["timings"] for c in clients if c.lines]
    finally:
        children.kill_all()
    round_s = [r["round_s"] for r in records]
    steady = round_s[1:-1] if len(round_s) > 2 else round_s[1:]
    fetch = [t["fetch_s"] for ct in client_timings for t in ct if t["round"] > 0]
    submit = [t["submit_s"] for ct in client_timings for t in ct if t["round"] > 0]
    peak = max(poller.peak / MB, reaped["ru_maxrss_mb"])
    cpu_per_round = None
    if len(snaps) == 2 and snaps[1][0] > snaps[0][0]:
        n = snaps[1][0] - snaps[0][0]
        per = [(b - a) / n for a, b in zip(snaps[0][2], snaps[1][2])]
        cpu_per_round = {"rounds": n, "wall_s_per_round": (snaps[1][1] - snaps[0][1]) / n,
                         "coordinator_cpu_s": per[0], "client_cpu_s": per[1:], "all_cpu_s": sum(per)}
    return {
        "max_concurrent_uploads": uploads,
        "parameters": own["parameters"],
        "payload_mb": own["payload_bytes"] / MB,
        "round_s": round_s,
        "round_0_s": round_s[0],
        "round_s_excl_round_0": summary_stats(round_s[1:]),
        "round_s_excl_round_0_and_last": summary_stats(steady),
        "last_round_s_incl_final_checkpoint": round_s[-1],
        "rounds_measured": len(round_s) - 1,
        "peak_rss_mb": peak,
        "peak_rss_polled_mb": poller.peak / MB,
        "peak_rss_wait4_ru_maxrss_mb": reaped["ru_maxrss_mb"],
        "ru_maxrss_self_reported_mb": own["ru_maxrss_self_mb"],
        "rss_start_mb": own["rss_start_mb"],
        "rss_after_import_mb": own["rss_after_import_mb"],
        "rss_after_coordinator_mb": own["rss_after_coordinator_mb"],
        "rss_at_end_mb": own["rss_at_end_mb"],
        "rss_samples": poller.samples,
        "rss_timeline_mb": poller.timeline,
        "coordinator_cpu_s": reaped["cpu_s"],
        "cpu_per_round": cpu_per_round,
        "coordinator_torch_threads": own["torch_threads"],
        "client_fetch_s": summary_stats(fetch),
        "client_submit_s": summary_stats(submit),
        "bytes_per_round_mb": (records[-1]["bytes_sent"] + records[-1]["bytes_received"]
                               - records[0]["bytes_sent"] - records[0]["bytes_received"]) / max(1, len(records) - 1) / MB,
        "goal_met": {"round_s": summary_stats(round_s[1:])["median"] <= GOAL_ROUND_S, "rss": peak <= GOAL_RSS_MB},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="training rounds per run, round 0 excluded (default: 12)")
    parser.add_argument("--uploads", default="2,1,4",
                        help="comma-separated --max-concurrent-uploads values, one run each (default: 2,1,4; 2 is the default)")
    parser.add_argument("--hidden", type=int, default=3300, help="MLP width H of 1-H-H-1 (default: 3300 -> 10.9M parameters)")
    parser.add_argument("--encoding", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--flat", action="store_true", help="clients submit views of one flat buffer (zero-copy encode)")
    parser.add_argument("--coordinator-threads", type=int, default=0, help="torch threads in the coordinator (0: default)")
    parser.add_argument("--coordinator-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the coordinator, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="RSS polling interval (default: 20 ms)")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="limit per run (default: 240)")
    parser.add_argument("--name", default=NAME, help=f"results file benchmarks/results/NAME.json (default: {NAME})")
    parser.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine first")
    return parser


def run_settings(**overrides: Any) -> argparse.Namespace:
    """This script's default settings (what one_run reads), with overrides; for other benchmarks."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ValueError(f"big_model_round has no setting {key!r}")
        setattr(args, key, value)
    return args


def main() -> int:
    args = build_parser().parse_args()

    info = machine()
    quiet = None if args.no_wait_quiet else wait_quiet()
    monitor = CpuMonitor()
    tmp = Path(tempfile.mkdtemp(prefix="fedmeta-big-"))
    runs = []
    try:
        for uploads in [int(u) for u in args.uploads.split(",") if u]:
            print(f"max-concurrent-uploads {uploads}: {args.rounds} rounds of 4 clients x (43.6 MB down + up) ...",
                  flush=True)
            runs.append(one_run(uploads, args, tmp))
            r = runs[-1]
            s = r["round_s_excl_round_0"]
            print(f"  round_s (excl. round 0, n={s['n']}): median {s['median']:.3f} s, max {s['max']:.3f} s "
                  f"(last round incl. final checkpoint {r['last_round_s_incl_final_checkpoint']:.3f} s); "
                  f"coordinator peak RSS {r['peak_rss_mb']:.0f} MB (polled {r['peak_rss_polled_mb']:.0f}, "
                  f"ru_maxrss {r['peak_rss_wait4_ru_maxrss_mb']:.0f}), after import {r['rss_after_import_mb']:.0f} MB, "
                  f"after Coordinator() {r['rss_after_coordinator_mb']:.0f} MB", flush=True)
            c = r["cpu_per_round"] or {}
            print(f"  client fetch median {r['client_fetch_s']['median']:.3f} s, submit median "
                  f"{r['client_submit_s']['median']:.3f} s; CPU per round: coordinator "
                  f"{c.get('coordinator_cpu_s', float('nan')):.2f} s, clients "
                  f"{sum(c.get('client_cpu_s', [])):.2f} s in all", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB
    result = {
        "settings": {"rounds": args.rounds, "hidden": args.hidden, "encoding": args.encoding, "flat": args.flat,
                     "clients": 4, "algorithm": "reptile", "checkpoint_every": "never (final round only)",
                     "coordinator_threads": args.coordinator_threads or "default", "poll_ms": args.poll_ms,
                     "coordinator_env": args.coordinator_env},
        "goal": {"round_s_max": GOAL_ROUND_S, "peak_rss_mb_max": GOAL_RSS_MB,
                 "flower_1_41_grpc": {"round_s": 3.9, "peak_rss_mb": 2000}},
        "runs": runs,
        "ru_maxrss_children_mb_max_over_all_children": usage,
        "cpu": monitor.stop(),
        "quiet_check": quiet,
        "machine": info,
    }
    path = write_result(args.name, result)
    cpu = result["cpu"]
    print(f"machine: {cpu['foreign_cpu_s']:.1f} CPU-s used by other processes during the benchmark "
          f"({100 * cpu['foreign_share_of_capacity']:.0f}% of capacity)")
    print(f"goal <= {GOAL_ROUND_S} s per round and <= {GOAL_RSS_MB:.0f} MB; results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
