"""Federated vs centralised: the same MAML sinusoid work as 4 client processes over gRPC and in one process.

Federated: `python -m fedmeta.server --local-clients 4 --rounds R --run-dir <tmp> --no-progress` (all other
settings default), timed from the outside (process wall, startup included) and from its own
summary.json (wall_s, counted from the Coordinator's construction) and metrics.jsonl (round_s).
Centralised: fedmeta.common.centralized.train + evaluate_held_out on the same RunConfig with data seeds
0..3, in a child process with torch.set_num_threads(T) for each T in --central-threads.

The breakdown of a federated round uses: the CPU time each process (coordinator, 4 clients)
spends per round between 10% and 90% of the run (psutil); alternating pairs of short runs
with the defaults, with --checkpoint-every 1000 (the cost of per-round checkpointing) and with
OMP_NUM_THREADS=1 in the coordinator's environment (the cost of idle OpenMP threads spinning); the
clients' compute_s from their logs (logged every 100 rounds); and in-process timings of the
MAML client step, the checkpoint write, the codec and the outer step with 1 thread.

    python benchmarks/fed_vs_central.py                              # R=1500, ~4 minutes on 2 cores
    python benchmarks/fed_vs_central.py --rounds 300 --ab-pairs 1    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Children, CpuMonitor, machine, summary_stats, wait_quiet, write_result  # noqa: E402
from benchmarks._components import component_timings  # noqa: E402

NAME = "fed_vs_central"
GOAL_RATIO = 1.5
_COMPUTE_LINE = re.compile(r"round (\d+): (\d+) tasks, query loss \S+ -> \S+, ([\d.]+) ms compute")


# ---- centralised child -------------------------------------------------------------------------------
def central_child(rounds: int, threads: int) -> None:
    """Runs in a child process: centralised train + evaluate; prints one JSON line."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from fedmeta.common.centralized import evaluate_held_out, train
    from fedmeta.server.config import build

    t_import = time.perf_counter()
    config = build({"rounds": rounds, "local_clients": 4, "run_dir": tempfile.mkdtemp(prefix="fedmeta-central-")})
    shutil.rmtree(config.run_dir, ignore_errors=True)  # build() only names it; nothing is written there
    stamps: list[float] = []
    start = time.perf_counter()
    params = train(config.run, outer_lr=config.outer_lr, data_seeds=range(4),
                   on_round=lambda r, m: stamps.append(time.perf_counter()))
    t_train = time.perf_counter()
    ev = evaluate_held_out(config.run, params, data_seeds=range(4))
    t_eval = time.perf_counter()
    round_s = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    print(json.dumps({
        "threads": threads,
        "import_s": t_import - t0,
        "train_s": t_train - start,
        "eval_s": t_eval - t_train,
        "train_eval_s": t_eval - start,
        "first_round_s": round_s[0],
        "round_s": summary_stats(round_s[1:]),
        "eval": ev,
    }), flush=True)


def run_central(children: Children, rounds: int, threads: int, timeout_s: float) -> dict[str, Any]:
    child = children.start([str(Path(__file__).resolve()), "--central-child", "--rounds", str(rounds),
                            "--threads", str(threads)])
    rc = child.wait(timeout_s)
    if rc != 0:
        raise RuntimeError(f"centralised run ({threads} threads) exited {rc}:\n{child.output()[-4000:]}")
    result = json.loads(child.lines[-1])
    result["process_wall_s"] = child.wall_s
    return result


# ---- federated run -----------------------------------------------------------------------------------
def _rounds_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _cpu_snapshot(pid: int) -> dict[str, Any] | None:
    """CPU seconds of the coordinator, of each of its children, and of the whole machine."""
    try:
        proc = psutil.Process(pid)
        kids = proc.children()
        out = {"coordinator": sum(proc.cpu_times()[:2]), "clients": {k.pid: sum(k.cpu_times()[:2]) for k in kids}}
    except psutil.Error:
        return None
    t = psutil.cpu_times()
    out["machine_busy"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    out["time"] = time.monotonic()
    return out


def _cpu_per_round(a: dict[str, Any], b: dict[str, Any], rounds: int) -> dict[str, Any]:
    ms = lambda x: round(1e3 * x / rounds, 2)  # noqa: E731
    clients = [ms(b["clients"][pid] - a["clients"][pid]) for pid in a["clients"] if pid in b["clients"]]
    ours = ms(b["coordinator"] - a["coordinator"]) + sum(clients)
    wall = ms(b["time"] - a["time"])
    return {"rounds": rounds, "wall_ms_per_round": wall, "coordinator_cpu_ms_per_round": ms(b["coordinator"] - a["coordinator"]),
            "client_cpu_ms_per_round": clients, "all_ours_cpu_ms_per_round": round(ours, 2),
            "machine_busy_cpu_ms_per_round": ms(b["machine_busy"] - a["machine_busy"]),
            "capacity_cpu_ms_per_round": round(wall * (os.cpu_count() or 1), 2)}


def run_federated(children: Children, rounds: int, run_dir: Path, extra: list[str], timeout_s: float,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    args = ["-m", "fedmeta.server", "--local-clients", "4", "--rounds", str(rounds), "--run-dir", str(run_dir),
            "--no-progress", *extra]
    coordinator = children.start(args, env=env)
    port = coordinator.wait_listening()
    listening_s = time.perf_counter() - coordinator.started
    deadline = time.monotonic() + timeout_s
    # CPU used per round by each process, between 10% and 90% of the rounds (start-up and warm-up excluded).
    marks = (max(2, rounds // 10), max(3, rounds * 9 // 10))
    snaps: list[tuple[int, dict[str, Any]]] = []
    while coordinator.proc.poll() is None:
        children.track()  # remember the local clients' pids, to kill them if this run fails
        if time.monotonic() > deadline:
            raise RuntimeError(f"federated run still running after {timeout_s} s")
        if len(snaps) < 2:
            done = _rounds_done(run_dir)
            if done >= marks[len(snaps)]:
                snap = _cpu_snapshot(coordinator.pid)
                if snap is not None:
                    snaps.append((_rounds_done(run_dir), snap))
        time.sleep(0.02)
    rc = coordinator.wait(10)
    if rc != 0:
        raise RuntimeError(f"coordinator exited {rc}:\n{coordinator.output()[-4000:]}")
    cpu = _cpu_per_round(snaps[0][1], snaps[1][1], snaps[1][0] - snaps[0][0]) if len(snaps) == 2 else None
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round_s = [r["round_s"] for r in records]
    # Newer coordinators record the clients' mean compute_s per round.
    compute_recorded = [r["client_compute_s"] for r in records[1:] if r.get("client_compute_s") is not None]
    wall_at_close = [r["wall_s"] for r in records]
    first_open = wall_at_close[0] - round_s[0]  # wall_s when round 0 opened (clients joined)
    gaps = [wall_at_close[i] - round_s[i] - wall_at_close[i - 1] for i in range(1, len(records))]
    compute_ms: list[float] = []
    first_compute_ms: list[float] = []
    for log in sorted((run_dir / "logs").glob("client-*.log")):
        for m in _COMPUTE_LINE.finditer(log.read_text()):
            (first_compute_ms if m.group(1) == "0" else compute_ms).append(float(m.group(3)))
    return {
        "command": " ".join(["python", *args]),
        "port": port,
        "process_wall_s": coordinator.wall_s,
        "listening_after_s": listening_s,
        "summary_wall_s": summary["wall_s"],
        "wall_s_before_round_0": first_open,
        "first_round_to_end_s": summary["wall_s"] - first_open,
        "training_s": wall_at_close[-1] - first_open,
        "eval_round_s": summary["wall_s"] - wall_at_close[-1],
        "round_0_s": round_s[0],
        "round_s_all": summary_stats(round_s),
        "round_s_after_0": summary_stats(round_s[1:]),
        "sum_round_s_after_0": sum(round_s[1:]),
        "gap_between_rounds_s": summary_stats(gaps),
        "client_compute_ms_logged": summary_stats(compute_ms),
        "client_first_compute_ms_logged": summary_stats(first_compute_ms),
        "client_compute_ms_recorded": summary_stats([1e3 * c for c in compute_recorded]),
        "eval": summary["eval"],
        "bytes_sent": summary["bytes_sent"],
        "bytes_received": summary["bytes_received"],
        "rounds_completed": summary["rounds_completed"],
        "cpu_per_round": cpu,
    }


def variants_ab(children: Children, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Alternating short runs: the defaults, --checkpoint-every N, and OMP_NUM_THREADS=1 in the environment.

    Alternation, and the median of the differences to the default run of the same pair, keep
    slow drifts in the machine's load from passing for an effect of the setting.
    """
    variants: list[tuple[str, list[str], dict[str, str]]] = [
        ("default", [], {}),
        (f"checkpoint_every_{args.checkpoint_variant}", ["--checkpoint-every", str(args.checkpoint_variant)], {}),
        ("env_OMP_NUM_THREADS_1", [], {"OMP_NUM_THREADS": "1"}),
    ]
    pairs = []
    for i in range(args.ab_pairs):
        row: dict[str, Any] = {}
        for name, flags, env in variants:
            r = run_federated(children, args.ab_rounds, tmp / f"ab{i}_{name}", flags, args.timeout_s, env=env)
            cpu = r["cpu_per_round"] or {}
            row[name] = {"round_ms_median": 1e3 * r["round_s_after_0"]["median"],
                         "coordinator_cpu_ms_per_round": cpu.get("coordinator_cpu_ms_per_round")}
            print(f"  pair {i}: {name}: median round {row[name]['round_ms_median']:.1f} ms, coordinator CPU "
                  f"{row[name]['coordinator_cpu_ms_per_round']} ms/round", flush=True)
        pairs.append(row)
    summary = {}
    for name, _, _ in variants[1:]:
        summary[name] = {
            "round_ms_saved_median": statistics.median(p["default"]["round_ms_median"] - p[name]["round_ms_median"]
                                                       for p in pairs),
            "coordinator_cpu_ms_saved_median": statistics.median(
                (p["default"]["coordinator_cpu_ms_per_round"] or 0) - (p[name]["coordinator_cpu_ms_per_round"] or 0)
                for p in pairs),
        }
    return {"rounds_per_run": args.ab_rounds, "variants": {n: {"flags": f, "env": e} for n, f, e in variants},
            "pairs": pairs, "vs_default": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1500, help="training rounds R (default: 1500)")
    parser.add_argument("--central-threads", default="1,2", help="torch threads for the centralised runs (default: 1,2)")
    parser.add_argument("--checkpoint-variant", type=int, default=1000,
                        help="compare --checkpoint-every 1 (default) with this value (default: 1000)")
    parser.add_argument("--ab-pairs", type=int, default=2,
                        help="alternating sets of short runs (defaults, --checkpoint-every N, OMP_NUM_THREADS=1); "
                             "0 skips them (default: 2)")
    parser.add_argument("--ab-rounds", type=int, default=300, help="rounds per comparison run (default: 300)")
    parser.add_argument("--compute-reps", type=int, default=300, help="repetitions of the in-process timings")
    parser.add_argument("--timeout-s", type=float, default=600, help="limit per child run (default: 600)")
    parser.add_argument("--keep", action="store_true", help="keep the federated run directories")
    parser.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine first")
    parser.add_argument("--name", default=NAME, help=f"results file benchmarks/results/NAME.json (default: {NAME})")
    parser.add_argument("--central-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.central_child:
        central_child(args.rounds, args.threads)
        return 0

    info = machine()
    quiet = None if args.no_wait_quiet else wait_quiet()
    monitor = CpuMonitor()
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="fedmeta-bench-"))
    results: dict[str, Any] = {"settings": {"rounds": args.rounds, "local_clients": 4, "algorithm": "maml",
                                            "task": "sinusoid", "other_settings": "defaults",
                                            "central_threads": args.central_threads,
                                            "checkpoint_variant": args.checkpoint_variant,
                                            "ab_pairs": args.ab_pairs, "ab_rounds": args.ab_rounds},
                               "machine": info}
    try:
        print(f"federated: 4 local clients, {args.rounds} rounds ...", flush=True)
        fed = run_federated(children, args.rounds, tmp / "fed", [], args.timeout_s)
        results["federated"] = fed
        central: dict[str, Any] = {}
        for threads in [int(t) for t in args.central_threads.split(",") if t]:
            print(f"centralised: {threads} thread(s) ...", flush=True)
            central[str(threads)] = run_central(children, args.rounds, threads, args.timeout_s)
        results["centralised"] = central
        if args.ab_pairs:
            print(f"variants: {args.ab_pairs} alternating sets of {args.ab_rounds}-round runs: defaults, "
                  f"--checkpoint-every {args.checkpoint_variant}, OMP_NUM_THREADS=1 ...", flush=True)
            results["variants_ab"] = variants_ab(children, args, tmp)
    finally:
        children.kill_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("in-process component timings (1 thread) ...", flush=True)
    comp = component_timings(args.compute_reps)
    results["components"] = comp
    results["cpu"] = monitor.stop()
    results["quiet_check"] = quiet

    c1 = central.get("1") or next(iter(central.values()))
    ratios = {
        "summary_wall_s_over_central_train_eval_s": fed["summary_wall_s"] / c1["train_eval_s"],
        "first_round_to_end_over_central_train_eval_s": fed["first_round_to_end_s"] / c1["train_eval_s"],
        "process_wall_over_central_process_wall": fed["process_wall_s"] / c1["process_wall_s"],
        "steady_round_median_over_central_round_median": (fed["round_s_after_0"]["median"]
                                                          / c1["round_s"]["median"]),
    }
    for t, c in central.items():
        ratios[f"summary_wall_s_over_central_{t}_threads_train_eval_s"] = fed["summary_wall_s"] / c["train_eval_s"]
    results["ratios"] = ratios
    results["goal"] = {"ratio_max": GOAL_RATIO, "metric": "summary_wall_s_over_central_train_eval_s",
                       "met": ratios["summary_wall_s_over_central_train_eval_s"] <= GOAL_RATIO}
    med = fed["round_s_after_0"]["median"]
    cpu_round = fed["cpu_per_round"] or {}
    breakdown: dict[str, Any] = {
        "round_s_median_ms": 1e3 * med,
        "wall_ms_per_round_10_to_90pct": cpu_round.get("wall_ms_per_round"),
        "coordinator_cpu_ms_per_round": cpu_round.get("coordinator_cpu_ms_per_round"),
        "clients_cpu_ms_per_round_sum": sum(cpu_round.get("client_cpu_ms_per_round", [])) or None,
        "per_client_cpu_ms_per_round_mean": (statistics.fmean(cpu_round["client_cpu_ms_per_round"])
                                             if cpu_round.get("client_cpu_ms_per_round") else None),
        "capacity_cpu_ms_per_round": cpu_round.get("capacity_cpu_ms_per_round"),
        "machine_busy_cpu_ms_per_round": cpu_round.get("machine_busy_cpu_ms_per_round"),
        "client_step_compute_ms_in_process": comp["maml_client_step_ms"],
        "client_step_compute_ms_logged_median": fed["client_compute_ms_logged"].get("median"),
        "client_step_compute_ms_recorded_median": fed["client_compute_ms_recorded"].get("median"),
        "checkpoint_save_ms_in_process": comp["checkpoint_save_ms"],
        "checkpoint_cost_ms_per_round_ab": results.get("variants_ab", {}).get("vs_default", {}).get(
            f"checkpoint_every_{args.checkpoint_variant}", {}).get("round_ms_saved_median"),
        "omp_spin_cost_ms_per_round_ab": results.get("variants_ab", {}).get("vs_default", {}).get(
            "env_OMP_NUM_THREADS_1", {}).get("round_ms_saved_median"),
        "omp_spin_coordinator_cpu_ms_per_round_ab": results.get("variants_ab", {}).get("vs_default", {}).get(
            "env_OMP_NUM_THREADS_1", {}).get("coordinator_cpu_ms_saved_median"),
        "gap_between_rounds_ms_median": 1e3 * fed["gap_between_rounds_s"]["median"],
    }
    results["breakdown"] = breakdown
    path = write_result(args.name, results)

    f, ev = fed, fed["eval"]
    print(f"\nfederated ({args.rounds} rounds, 4 client processes):")
    print(f"  process wall {f['process_wall_s']:.1f} s (coordinator listening after {f['listening_after_s']:.1f} s); "
          f"summary wall_s {f['summary_wall_s']:.1f} s = {f['wall_s_before_round_0']:.1f} s before round 0 "
          f"+ {f['training_s']:.1f} s training + {f['eval_round_s']:.2f} s evaluation")
    print(f"  round 0 {f['round_0_s']:.2f} s; later rounds median {1e3 * med:.1f} ms, "
          f"p90 {1e3 * f['round_s_after_0']['p90']:.1f} ms, max {1e3 * f['round_s_after_0']['max']:.1f} ms")
    print(f"  eval loss_pre {ev['loss_pre']:.4f}  loss_post {ev['loss_post']:.4f}")
    for t, c in central.items():
        print(f"centralised, {t} thread(s): train+eval {c['train_eval_s']:.1f} s (train {c['train_s']:.1f} s, "
              f"first round {c['first_round_s']:.2f} s, median round {1e3 * c['round_s']['median']:.1f} ms), "
              f"process wall {c['process_wall_s']:.1f} s; eval loss_pre {c['eval']['loss_pre']:.4f} "
              f"loss_post {c['eval']['loss_post']:.4f}")
    r = ratios["summary_wall_s_over_central_train_eval_s"]
    print(f"ratio federated/centralised (summary wall_s / 1-thread train+eval): {r:.2f} "
          f"(goal <= {GOAL_RATIO}: {'met' if r <= GOAL_RATIO else 'NOT met'}); "
          f"first-round-to-end {ratios['first_round_to_end_over_central_train_eval_s']:.2f}, "
          f"process wall {ratios['process_wall_over_central_process_wall']:.2f}, "
          f"steady round {ratios['steady_round_median_over_central_round_median']:.2f}")
    print("per federated round (ms): " + ", ".join(
        f"{k} {v:.2f}" for k, v in breakdown.items() if isinstance(v, (int, float))))
    cpu = results["cpu"]
    print(f"machine: {cpu['foreign_cpu_s']:.0f} CPU-s used by other processes during the benchmark "
          f"({100 * cpu['foreign_share_of_capacity']:.0f}% of capacity)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
