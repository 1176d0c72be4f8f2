"""Buffered asynchronous rounds (FedBuff) vs synchronous rounds with stragglers: wall time to the same loss.

4 client processes, 2 of them 10x slower (--slow-task-s F for the fast ones, 10 F for the slow ones,
slept before every training step), MAML on sinusoids, all other settings default. sync: every round
waits for its 4 clients. buffered: --schedule buffered --buffer-size K, up to 4 assignments at once,
s(τ) = (1 + τ)^-a. The runs alternate (sync, buffered, sync, ...) in one invocation. The coordinator
runs in this process behind real gRPC on 127.0.0.1 (the clients are processes), so θ after every outer
step is captured with its time (on_round, in the round thread that made it). Afterwards every captured
θ is evaluated on the same held-out tasks (--eval-tasks, 5-shot, 10 adaptation steps, 100 queries).
Loss curves are smoothed by a trailing mean over 3 captured θ. Target of a pair: the sync run's final
(smoothed) held-out loss. Reported per schedule: seconds from the end of its first outer step to the
θ from which the smoothed loss stays at or below the target to the end of the run (the first
crossing, noisier, is reported too); startup and process spawn are not counted in either.

Then the staleness measurement of benchmarks/_staleness.py: cosine between a stale meta-gradient at
θ_{t-τ} and the fresh one at θ_t, τ = 0, 1, 2, 4, 8, during a real centralised MAML run.

    python benchmarks/buffered.py                        # ~3-4 minutes on 2 loaded cores
    python benchmarks/buffered.py --pairs 1 --sync-rounds 20 --staleness-steps 40   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Children, machine, write_result  # noqa: E402
from benchmarks._staleness import measure  # noqa: E402
from fedmeta.common.algorithms import get_algorithm  # noqa: E402
from fedmeta.common.evaluation import evaluate  # noqa: E402
from fedmeta.common.models import build_model  # noqa: E402
from fedmeta.common.tasks import loss_for, sample_batch  # noqa: E402
from fedmeta.server.config import build  # noqa: E402
from fedmeta.server.coordinator import Coordinator  # noqa: E402
from fedmeta.server.grpc_server import create_server  # noqa: E402

NAME = "buffered"
GOAL_RATIO = 2.0  # buffered should need at most half the synchronous wall time


def one_run(schedule: str, *, rounds: int, fast_s: float, slow_factor: float, buffer_size: int, exponent: float,
            max_staleness: int, work: Path) -> dict[str, Any]:
    """One federated run; returns its captured θ with times and its per-step records."""
    values: dict[str, Any] = {"run_dir": str(work / f"{schedule}-{time.time_ns()}"), "port": 0, "rounds": rounds,
                              "clients_per_round": 4, "min_clients": 1, "schedule": schedule,
                              "buffer_size": buffer_size, "staleness_exponent": exponent,
                              "max_staleness": max_staleness, "eval_tasks_per_client": 5, "eval_queries": 20,
                              "checkpoint_every": 1000}
    config = build(values)
    snaps: list[tuple[float, int, torch.Tensor]] = []
    records: list[dict[str, Any]] = []
    holder: dict[str, Coordinator] = {}
    lock = threading.Lock()

    def on_round(record: dict[str, Any]) -> None:
        if "event" in record:
            return
        with lock:
            snaps.append((time.monotonic(), record["round"], holder["c"].broadcast.theta.clone()))
            records.append(record)

    coordinator = Coordinator(config, on_round=on_round)
    holder["c"] = coordinator
    server, port = create_server(config, coordinator)
    server.start()
    coordinator.start()
    children = Children()
    try:
        for i in range(4):
            slow = fast_s * (slow_factor if i >= 2 else 1.0)
            children.start(["-m", "fedmeta.client", "--server", f"127.0.0.1:{port}", "--client-id", f"c{i}",
                            "--data-seed", str(i), "--threads", "1", "--slow-task-s", str(slow)])
        if not coordinator.finished.wait(timeout=900):
            raise RuntimeError(f"{schedule} run did not finish within 900 s")
        for child in children.children:
            child.wait(60)
    finally:
        children.kill_all()
        coordinator.stop()
        server.stop(grace=None)
    return {"schedule": schedule, "snaps": snaps, "records": records, "layout": coordinator.layout,
            "run": config.run}


def held_out_curve(result: dict[str, Any], tasks: int) -> list[dict[str, float]]:
    """Held-out loss of every captured θ, on the same tasks for every run."""
    run = result["run"]
    algorithm, model, loss_fn = get_algorithm(run.algorithm), build_model(run.model), loss_for(run.task)
    batch = sample_batch("sinusoid", num_tasks=tasks, shots=5, queries=100, seed=987_654)
    t0 = result["snaps"][0][0]
    curve = []
    for stamp, step, theta in result["snaps"]:
        m = evaluate(algorithm, model, result["layout"].views(theta), batch, loss_fn, steps=10, lr=run.inner_lr,
                     vectorize=True, classification=False, curve_tasks=0)
        curve.append({"t_s": stamp - t0, "step": step, "loss": m["loss_post"]})
    for i, point in enumerate(curve):  # a trailing mean over 3 captured θ
        window = curve[max(0, i - 2): i + 1]
        point["smoothed"] = statistics.fmean(p["loss"] for p in window)
    return curve


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """When the smoothed curve first reaches the target."""
    return next((p["t_s"] for p in curve if p["smoothed"] <= target), None)


def time_to_stay(curve: list[dict[str, float]], target: float) -> tuple[float | None, int | None]:
    """(time, steps) from which the smoothed curve stays at or below the target to the end of the run."""
    found: tuple[float | None, int | None] = (None, None)
    for p in reversed(curve):
        if p["smoothed"] > target:
            break
        found = (p["t_s"], int(p["step"]) + 1)
    return found


def summarize(result: dict[str, Any], curve: list[dict[str, float]], target: float) -> dict[str, Any]:
    recs = result["records"]
    stale = [r["staleness_mean"] for r in recs if r.get("staleness_mean") is not None]
    return {
        "schedule": result["schedule"],
        "steps": len(recs),
        "wall_s_after_first_step": curve[-1]["t_s"],
        "final_loss": curve[-1]["smoothed"],
        "first_reached_s": time_to(curve, target),
        "time_to_target_s": time_to_stay(curve, target)[0],  # reached and stayed: what the speedup uses
        "steps_to_target": time_to_stay(curve, target)[1],
        "staleness_mean": statistics.fmean(stale) if stale else 0.0,
        "staleness_max": max((r["staleness_max"] for r in recs if r.get("staleness_max") is not None), default=0),
        "refused_stale": sum(r.get("refused_stale", 0) for r in recs),
        "curve": [{k: round(v, 4) for k, v in p.items()} for p in curve[:: max(1, len(curve) // 40)]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2, help="sync/buffered pairs, alternating")
    p.add_argument("--sync-rounds", type=int, default=30)
    p.add_argument("--buffered-rounds", type=int, default=0, help="outer steps of a buffered run (0: 4 x sync)")
    p.add_argument("--fast-s", type=float, default=0.05, help="--slow-task-s of the fast clients")
    p.add_argument("--slow-factor", type=float, default=10.0)
    p.add_argument("--buffer-size", type=int, default=2)
    p.add_argument("--staleness-exponent", type=float, default=0.5)
    p.add_argument("--max-staleness", type=int, default=16)
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--staleness-steps", type=int, default=80, help="0: skip the staleness measurement")
    args = p.parse_args()
    buffered_rounds = args.buffered_rounds or 4 * args.sync_rounds
    work = Path(tempfile.mkdtemp(prefix="fedmeta-buffered-"))
    pairs = []
    for i in range(args.pairs):
        sync = one_run("sync", rounds=args.sync_rounds, fast_s=args.fast_s, slow_factor=args.slow_factor,
                       buffer_size=args.buffer_size, exponent=args.staleness_exponent,
                       max_staleness=args.max_staleness, work=work)
        buf = one_run("buffered", rounds=buffered_rounds, fast_s=args.fast_s, slow_factor=args.slow_factor,
                      buffer_size=args.buffer_size, exponent=args.staleness_exponent,
                      max_staleness=args.max_staleness, work=work)
        sync_curve, buf_curve = held_out_curve(sync, args.eval_tasks), held_out_curve(buf, args.eval_tasks)
        target = sync_curve[-1]["smoothed"]
        s, b = summarize(sync, sync_curve, target), summarize(buf, buf_curve, target)
        ratio = (s["time_to_target_s"] / b["time_to_target_s"]
                 if s["time_to_target_s"] and b["time_to_target_s"] else None)
        pairs.append({"pair": i, "target_loss": target, "sync": s, "buffered": b, "speedup": ratio})
        print(f"pair {i}: target {target:.3f}; sync {s['time_to_target_s']:.1f} s ({s['steps_to_target']} steps), "
              f"buffered {b['time_to_target_s'] if b['time_to_target_s'] is None else round(b['time_to_target_s'], 1)}"
              f" s ({b['steps_to_target']} steps, staleness mean {b['staleness_mean']:.1f} max {b['staleness_max']})"
              f"; speedup {ratio if ratio is None else round(ratio, 2)}", flush=True)
    speedups = [pr["speedup"] for pr in pairs if pr["speedup"] is not None]
    staleness = None
    if args.staleness_steps > 0:
        steps = args.staleness_steps
        staleness = measure(steps=steps, at=sorted({steps // 4, steps // 2, steps}), taus=[0, 1, 2, 4, 8],
                            batch_tasks=200)
        for tau, row in staleness["by_tau"].items():
            print(f"tau {tau}: cosine(stale, fresh) {row['cosine_mean']:.3f} (min {row['cosine_min']:.3f}), "
                  f"relative error {row['relative_error_mean']:.3f}, |Δθ| {row['theta_moved_mean']:.3f}")
        print(f"noise floor: cosine between two fresh {staleness['settings']['tasks_per_client']}-task meta-gradients "
              f"{staleness['noise_floor_cosine_mean']:.3f}")
    result = {
        "machine": machine(),
        "settings": {"clients": 4, "slow_clients": 2, "fast_slow_task_s": args.fast_s,
                     "slow_slow_task_s": args.fast_s * args.slow_factor, "sync_rounds": args.sync_rounds,
                     "buffered_rounds": buffered_rounds, "buffer_size": args.buffer_size,
                     "staleness_exponent": args.staleness_exponent, "max_staleness": args.max_staleness,
                     "eval_tasks": args.eval_tasks, "algorithm": "maml", "task": "sinusoid"},
        "pairs": pairs,
        "speedup_median": statistics.median(speedups) if speedups else None,
        "goal": f"buffered reaches the sync run's final held-out loss in at most 1/{GOAL_RATIO:g} of its time",
        "goal_met": bool(speedups) and len(speedups) == len(pairs) and statistics.median(speedups) >= GOAL_RATIO,
        "staleness": staleness,
    }
    path = write_result(NAME, result)
    print(f"speedup median {result['speedup_median']}; goal met: {result['goal_met']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
