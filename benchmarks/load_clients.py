"""Load: one coordinator process and hundreds of concurrent lightweight clients on the real gRPC protocol.

A coordinator (`python -m fedmeta.server` on 127.0.0.1, Reptile, `--aggregator mean`, every client sampled
every round: `--clients-per-round N --min-clients N`) and N clients spread over --processes
load-generator processes (benchmarks/_load_worker.py: one thread and one TCP connection per
client; Join, WaitForAssignment long-polls, FetchParameters when theta is not inlined,
SubmitUpdate with header, chunks and UpdateEnd, metrics-only answers to EVALUATE, until FINISHED).
A client's update is s * P, a fixed pattern times a small integer that depends on the client and
the round, so the coordinator's float32 sums are exact.

Checks, per run:
- exactly once: per round, the accepted (non-duplicate) submissions the clients saw equal
  metrics.jsonl `clients_answered`, no (client, round) is accepted twice, every deliberate resend
  of an accepted update (--resend-every) is acknowledged as a duplicate, and the evaluation
  answers equal summary.json's `eval.clients`;
- theta: recomputed from the initial parameters, the updates each round's accepted clients sent and
  the algorithm's outer step; the parameter version (SHA-256 of theta) after every round must equal
  the one in metrics.jsonl, and the exported model must equal the recomputed theta bit for bit;
- no stalls: every round has all N answers and closes before --round-deadline-s, and the
  coordinator never logs a passed deadline;
- latency: round_s (metrics.jsonl) and client-observed times (assignment -> accepted) as p50/p90/p99/max;
- memory: the coordinator's RSS (psutil every --poll-ms, and ru_maxrss via os.wait4) above its RSS
  once listening, for the sinusoid MLP (1,761 parameters) and, with the RSS runs, for a ~1M-parameter
  MLP (gaussian task, --rss-dim inputs) at N and N/8 clients: O(model) memory for the mean means the
  extra growth per extra client stays far below one model size.

    python benchmarks/load_clients.py                              # 256 clients in 4 processes, 20 rounds, + RSS runs
    python benchmarks/load_clients.py --clients 64 --rounds 5 --no-rss-runs   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, Children, CpuMonitor, machine, wait_quiet, write_result  # noqa: E402
from benchmarks.big_model_round import wait4  # noqa: E402
from benchmarks._load_analysis import analyse  # noqa: E402

NAME = "load_clients"
MB = 1e6
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RunSpec:
    """One coordinator run: how many clients, rounds, which model."""

    label: str
    clients: int
    processes: int
    rounds: int
    round_deadline_s: float
    task: str = "sinusoid"
    dim: int = 16
    per_round: int = 0  # clients sampled per round (0: all)

    @property
    def sampled(self) -> int:
        return self.per_round or self.clients


class RssSampler:
    """Samples one process's RSS every interval_s in a thread, with time.monotonic() stamps."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.threads_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
                self.threads_max = max(self.threads_max, self.proc.num_threads())
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def timeline(self, origin: float, every_s: float = 0.25) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for t, rss in self.samples:
            if not out or t - origin - out[-1][0] >= every_s:
                out.append((round(t - origin, 2), round(rss / MB, 1)))
        return out


def server_values(spec: RunSpec, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    return {
        "algorithm": args.algorithm, "aggregator": "mean", "task": spec.task, "dim": spec.dim, "seed": 0,
        "rounds": spec.rounds, "clients_per_round": spec.sampled, "min_clients": spec.sampled,
        "round_deadline_s": spec.round_deadline_s, "poll_timeout_s": args.poll_timeout_s,
        "max_clients": max(10000, spec.clients),
        # every load client connects from 127.0.0.1: the per-address Join rate is not what is measured
        "joins_per_s": 1e6,
        "run_dir": str(run_dir), "port": 0, "host": "127.0.0.1",
    } | ({"chunk_bytes": args.chunk_bytes} if getattr(args, "chunk_bytes", 0) else {}) \
      | ({"max_workers": args.max_workers} if getattr(args, "max_workers", 0) else {})


def worker_command(args: argparse.Namespace, spec: RunSpec, port: int, first: int, n: int) -> list[str]:
    """A load process: threads (_load_worker.py) or, for thousands of clients, coroutines (_aio_load_worker.py)."""
    worker = getattr(args, "worker", "auto")
    aio = worker == "aio" or (worker == "auto" and spec.clients > 1000)
    command = [str(HERE / ("_aio_load_worker.py" if aio else "_load_worker.py")), "--server", f"127.0.0.1:{port}",
               "--first-index", str(first), "--clients", str(n), "--resend-every", str(args.resend_every)]
    if aio and getattr(args, "no_carry", False):
        command.append("--no-carry")
    return command


def one_run(spec: RunSpec, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / spec.label
    values = server_values(spec, args, run_dir)
    flags = [item for k, v in values.items() for item in (f"--{k.replace('_', '-')}", str(v))]
    children = Children()
    try:
        server = children.start(["-m", "fedmeta.server", *flags, *getattr(args, "coordinator_flag", []), "--no-progress"],
                                env=dict(kv.split("=", 1) for kv in args.coordinator_env))
        sampler = RssSampler(server.pid, args.poll_ms / 1e3)
        port = server.wait_listening()
        started = time.monotonic()
        rss_listening = psutil.Process(server.pid).memory_info().rss
        sizes = [spec.clients // spec.processes + (i < spec.clients % spec.processes) for i in range(spec.processes)]
        workers = [children.start(worker_command(args, spec, port, sum(sizes[:i]), n))
                   for i, n in enumerate(sizes) if n]
        snaps: list[tuple[int, float, list[float]]] = []
        reaped = wait4(server, args.timeout_s, run_dir=run_dir, rounds=spec.rounds,
                       pids=[server.pid, *(w.pid for w in workers)], snaps=snaps)
        wall_s = time.monotonic() - started
        sampler.stop()
        for w in workers:
            w.wait(120)
        for t in server._threads:
            t.join(timeout=5)
        if reaped["returncode"] != 0:
            raise RuntimeError(f"coordinator exited {reaped['returncode']}:\n{server.output()[-4000:]}")
        outs = []
        for w in workers:
            if not w.lines:
                raise RuntimeError(f"load worker exited {w.proc.returncode} without a report:\n{w.output()[-4000:]}")
            outs.append(json.loads(w.lines[-1]))
    finally:
        children.kill_all()
    result = analyse(spec, values, run_dir, clients_of(outs), server.output())
    # The training rounds: from listening (joins included) to the evaluation round's first assignment,
    # which comes right after the last training round's outer step, checkpoint and metrics.
    evaluation = [r["assigned"] for c in clients_of(outs) for r in c["records"] if r["action"] == "evaluate"]
    rounds_end = min(evaluation, default=float("inf"))
    peak = sampler.peak(started, rounds_end)
    model_bytes = result["parameters"] * 4
    result["wall_s_from_listening"] = wall_s
    result["worker_exit_codes"] = [w.proc.returncode for w in workers]
    result["memory"] = {
        "model_mb": model_bytes / MB,
        "rss_listening_mb": rss_listening / MB,
        "peak_rss_in_rounds_mb": peak / MB,
        "growth_mb": (peak - rss_listening) / MB,
        "growth_in_model_sizes": (peak - rss_listening) / model_bytes,
        "clients_x_model_mb": spec.clients * model_bytes / MB,
        # Over the whole process life: also the evaluation round, the model export and the end-of-run plots.
        "peak_rss_whole_run_polled_mb": sampler.peak() / MB,
        "peak_rss_whole_run_wait4_ru_maxrss_mb": reaped["ru_maxrss_mb"],
        "rss_samples": len(sampler.samples),
        "rss_timeline_mb": sampler.timeline(started),
        "rounds_window_s": rounds_end - started,
    }
    result["coordinator_threads_max"] = sampler.threads_max
    result["coordinator_cpu_s"] = reaped["cpu_s"]
    if len(snaps) == 2 and snaps[1][0] > snaps[0][0]:
        n = snaps[1][0] - snaps[0][0]
        per = [(b - a) / n for a, b in zip(snaps[0][2], snaps[1][2], strict=True)]
        result["cpu_per_round"] = {"rounds": n, "wall_s_per_round": (snaps[1][1] - snaps[0][1]) / n,
                                   "coordinator_cpu_s": per[0], "load_workers_cpu_s": sum(per[1:])}
    return result


def clients_of(outs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for o in outs for c in o["clients"]]


def print_run(r: dict[str, Any]) -> None:
    lat, mem, c = r["latency_s"], r["memory"], r["checks"]
    rs, cl = lat["round_s_excl_round_0"], lat["client_assignment_to_accepted"]
    print(f"  {r['label']:<14}{r['clients']:>8}{r['sampled_per_round']:>7}{r['rounds']:>7}{r['parameters']:>11,}"
          f"  {rs.get('p50', 0):6.3f} {rs.get('p90', 0):6.3f} {rs.get('p99', 0):6.3f} {rs.get('max', 0):6.3f}"
          f"  {lat['round_0_s']:6.2f}  {cl.get('p50', 0):6.3f} {cl.get('p99', 0):6.3f}"
          f"  {mem['peak_rss_in_rounds_mb']:7.0f} {mem['growth_mb']:+7.0f}"
          f"  {'yes' if c['exactly_once'] else 'NO':>5} {'yes' if c['theta_matches'] else 'NO':>5}"
          f" {'yes' if c['no_stall'] else 'NO':>5} {'yes' if c['no_client_errors'] else 'NO':>6}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256, help="concurrent clients, all sampled every round (default: 256)")
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes the clients are spread over (default: 4)")
    parser.add_argument("--clients-per-round", type=int, default=0,
                        help="clients sampled per round (default: all); the others keep long-polling")
    parser.add_argument("--worker", choices=["auto", "threads", "aio"], default="auto",
                        help="load processes: a thread per client, or coroutines (default auto: aio above 1000 clients)")
    parser.add_argument("--rounds", type=int, default=20, help="training rounds of the main run (default: 20)")
    parser.add_argument("--algorithm", default="reptile", choices=["reptile", "fomaml", "maml"],
                        help="the coordinator's algorithm: its outer step is replayed to check theta (default: reptile)")
    parser.add_argument("--round-deadline-s", type=float, default=30.0, help="the coordinator's round deadline (default: 30, its own default)")
    parser.add_argument("--poll-timeout-s", type=float, default=10.0, help="the coordinator's long-poll (default: 10, its own default)")
    parser.add_argument("--max-workers", type=int, default=0,
                        help="the coordinator's worker threads (default: its own default)")
    parser.add_argument("--resend-every", type=int, default=8,
                        help="client i sends its accepted update of round r a second time when (i + r) %% N == 0, "
                             "as after a lost reply; it must come back as a duplicate (default: 8; 0: never)")
    parser.add_argument("--no-carry", action="store_true",
                        help="coroutine clients send each update on its own call, not with their next long-poll")
    parser.add_argument("--no-rss-runs", action="store_true", help="skip the two runs with the ~1M-parameter model")
    parser.add_argument("--rss-dim", type=int, default=16000,
                        help="inputs of the RSS runs' MLP DIM-64-64-5 (default: 16000 -> 1,028,549 parameters, 4.1 MB)")
    parser.add_argument("--rss-rounds", type=int, default=4, help="rounds of each RSS run (default: 4)")
    parser.add_argument("--rss-round-deadline-s", type=float, default=120.0,
                        help="round deadline of the RSS runs (default: 120; 256 clients move 2 GB a round there)")
    parser.add_argument("--rss-few-clients", type=int, default=0, help="clients of the smaller RSS run (default: clients / 8)")
    parser.add_argument("--coordinator-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the coordinator, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--coordinator-flag", action="append", default=[], metavar="FLAG",
                        help="an extra coordinator argument, e.g. --coordinator-flag=--max-concurrent-downloads=4 "
                             "(repeatable)")
    parser.add_argument("--chunk-bytes", type=int, default=0, help="the run's --chunk-bytes (default: its own, 1 MiB)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="RSS polling interval (default: 20 ms)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit per run (default: 600)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json", help="results file (default: %(default)s)")
    parser.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine first")
    args = parser.parse_args()
    if args.clients < 1 or args.processes < 1 or args.rounds < 1:
        parser.error("--clients, --processes and --rounds: expected positive integers")

    specs = [RunSpec(f"mlp-{args.clients}", args.clients, args.processes, args.rounds, args.round_deadline_s,
                     per_round=args.clients_per_round)]
    if not args.no_rss_runs:
        few = args.rss_few_clients or max(1, args.clients // 8)
        for n in (few, args.clients):
            specs.append(RunSpec(f"mlp{args.rss_dim}-{n}", n, min(args.processes, n), args.rss_rounds,
                                 args.rss_round_deadline_s, task="gaussian", dim=args.rss_dim))
    info = machine()
    quiet = None if args.no_wait_quiet else wait_quiet()
    monitor = CpuMonitor()
    tmp = Path(tempfile.mkdtemp(prefix="fedmeta-load-"))
    runs = []
    print(f"  {'run':<14}{'clients':>8}{'sampled':>7}{'rounds':>7}{'params':>11}  round_s excl. round 0"
          f"       round0  client s      RSS MB, rounds  exactly theta  no    client\n"
          f"  {'':<47}  {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}  {'':>6}  {'p50':>6} {'p99':>6}"
          f"  {'peak':>7} {'growth':>7}  {'once':>5} {'ok':>5} {'stall':>5} {'errors':>6}", flush=True)
    try:
        for spec in specs:
            runs.append(one_run(spec, args, tmp))
            print_run(runs[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    comparison = None
    big = [r for r in runs if r["model"]["task"] == "gaussian"]
    if len(big) == 2 and big[1]["clients"] > big[0]["clients"]:
        extra_clients = big[1]["clients"] - big[0]["clients"]
        extra_mb = big[1]["memory"]["growth_mb"] - big[0]["memory"]["growth_mb"]
        comparison = {
            "model_mb": big[1]["memory"]["model_mb"],
            "clients": [big[0]["clients"], big[1]["clients"]],
            "growth_mb": [big[0]["memory"]["growth_mb"], big[1]["memory"]["growth_mb"]],
            "extra_growth_mb": extra_mb,
            "extra_clients_x_model_mb": extra_clients * big[1]["memory"]["model_mb"],
            "extra_growth_per_extra_client_in_model_sizes": extra_mb / (extra_clients * big[1]["memory"]["model_mb"]),
        }
        print(f"RSS, {comparison['model_mb']:.1f} MB model: growth {comparison['growth_mb'][0]:.0f} MB with "
              f"{big[0]['clients']} clients, {comparison['growth_mb'][1]:.0f} MB with {big[1]['clients']}: "
              f"{extra_mb:+.0f} MB for {extra_clients} more clients (clients x model would be "
              f"+{comparison['extra_clients_x_model_mb']:.0f} MB; "
              f"{comparison['extra_growth_per_extra_client_in_model_sizes']:.3f} model sizes per extra client)")
    ok = all(all(r["checks"].values()) for r in runs)
    cpu = monitor.stop()
    result: dict[str, Any] = {
        "settings": {"clients": args.clients, "clients_per_round": args.clients_per_round or args.clients,
                     "worker": args.worker, "processes": args.processes, "rounds": args.rounds,
                     "algorithm": args.algorithm, "aggregator": "mean", "round_deadline_s": args.round_deadline_s,
                     "poll_timeout_s": args.poll_timeout_s, "resend_every": args.resend_every, "carry": not args.no_carry,
                     "max_workers": args.max_workers or "coordinator default",
                     "rss_runs": not args.no_rss_runs, "rss_dim": args.rss_dim, "rss_rounds": args.rss_rounds,
                     "rss_round_deadline_s": args.rss_round_deadline_s, "coordinator_env": args.coordinator_env,
                     "coordinator_flags": args.coordinator_flag,
                     "poll_ms": args.poll_ms, "chunk_bytes": args.chunk_bytes or "default"},
        "all_checks_passed": ok,
        "runs": runs,
        "rss_comparison": comparison,
        "cpu": cpu,
        "quiet_check": quiet,
        "machine": info,
    }
    out = args.out.resolve()
    if out.parent == RESULTS.resolve():
        path = write_result(out.stem, result)
    else:  # write_result writes into benchmarks/results/; move its file to --out
        written = write_result(f".{NAME}-{os.getpid()}", result)
        out.parent.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.move(str(written), str(out)))
        path.write_text(json.dumps(json.loads(path.read_text()) | {"benchmark": NAME}, indent=2) + "\n")
    print(f"machine: {cpu['foreign_cpu_s']:.1f} CPU-s used by other processes during the benchmark "
          f"({100 * cpu['foreign_share_of_capacity']:.0f}% of capacity)")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
