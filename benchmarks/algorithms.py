"""Client step time and peak memory of every algorithm, batched with torch.func.vmap and looped.

Each measurement runs in a fresh child process (so its peak RSS is its own): it builds the
model and one meta-batch, runs the client step once to warm up, then --reps times, and
reports the median time and the process's peak RSS minus its peak RSS after a client step
on a one-task batch (which pays torch's lazy initialisation): the meta-batch's own memory.

Workloads (one thread, as a client on a 2-core machine uses):
  sinusoid   MLP 1-40-40-1, meta-batch 25, 5 shots, 10 queries, 1 inner step (MAML's setting)
  conv4      Conv4 on 28x28 inputs, 5-way 1-shot, 15 queries per class, meta-batch --conv-tasks,
             1 inner step (inputs are random: timing and memory do not depend on the pixels)

protonet, matchingnet and relationnet run on Gaussian 5-way tasks instead of sinusoid (classification only);
fedavg and perfedavg are sequential by definition (local SGD steps) and always loop.

    python benchmarks/algorithms.py                         # every algorithm, both workloads
    python benchmarks/algorithms.py --workloads conv4 --algorithms maml,fomaml,anil,reptile
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, wait_quiet, write_result  # noqa: E402

SEQUENTIAL = {"fedavg", "perfedavg"}


def _batch(workload: str, algorithm: str, tasks: int):  # type: ignore[no-untyped-def]
    import torch

    from fedmeta.common.config import RunConfig
    from fedmeta.common.models import ENCODERS, default_model
    from fedmeta.common.tasks import TaskBatch, make_tasks

    if workload == "conv4":
        spec = default_model("omniglot", algorithm=algorithm)
        run = RunConfig(run_id="bench", algorithm=algorithm, task="omniglot", model=spec, inner_steps=1, inner_lr=0.4,
                        tasks_per_client=tasks, shots=1, queries=15)
        gen = torch.Generator().manual_seed(0)
        n, k, q = 5, 1, 15
        labels_s = torch.arange(n).repeat_interleave(k).expand(tasks, -1).contiguous()
        labels_q = torch.arange(n).repeat_interleave(q).expand(tasks, -1).contiguous()
        batch = TaskBatch(torch.rand(tasks, n * k, 1, 28, 28, generator=gen), labels_s,
                          torch.rand(tasks, n * q, 1, 28, 28, generator=gen), labels_q)
        return run, batch
    task = "gaussian" if algorithm in ENCODERS else "sinusoid"  # the metric-based ones: classification only
    run = RunConfig(run_id="bench", algorithm=algorithm, task=task, model=default_model(task, algorithm=algorithm),
                    inner_steps=1, inner_lr=0.01 if task == "sinusoid" else 0.4, tasks_per_client=tasks, shots=5,
                    queries=10)
    batch = make_tasks(run).sample("train", num_tasks=tasks, shots=5, queries=10, seed=1)
    return run, batch


def child(workload: str, algorithm: str, vectorize: bool, tasks: int, reps: int) -> dict[str, Any]:
    """One measurement, in this process."""
    import torch

    from fedmeta.common.algorithms import InnerConfig, get_algorithm, meta_parameters
    from fedmeta.common.models import build_model
    from fedmeta.common.tasks import TaskBatch, loss_for

    torch.set_num_threads(1)
    run, batch = _batch(workload, algorithm, tasks)
    model = build_model(run.model)
    params = meta_parameters(run, 0)
    algo = get_algorithm(algorithm)
    inner = InnerConfig.from_run(run, vectorize=vectorize)
    loss_fn = loss_for(run.task)
    one = TaskBatch(*(t[:1] for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    algo.client_step(model, params, one, loss_fn, inner)  # lazy initialisation, not the step's memory
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        algo.client_step(model, params, batch, loss_fn, inner)
        if i:
            times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
            "step_peak_mb": (rss_after - rss_before) / 1024, "process_peak_mb": rss_after / 1024}


def measure(workload: str, algorithm: str, vectorize: bool, tasks: int, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", workload, algorithm, "vmap" if vectorize else "loop",
           str(tasks), str(reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    from fedmeta.common.algorithms import ALGORITHMS

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        workload, algorithm, mode, tasks, reps = sys.argv[2:7]
        print(json.dumps(child(workload, algorithm, mode == "vmap", int(tasks), int(reps))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(sorted(ALGORITHMS)), help="comma-separated (default: all)")
    parser.add_argument("--workloads", default="sinusoid,conv4", help="sinusoid and/or conv4")
    parser.add_argument("--sinusoid-tasks", type=int, default=25, help="meta-batch for the MLP workload")
    parser.add_argument("--conv-tasks", type=int, default=32, help="meta-batch for the Conv4 workload")
    parser.add_argument("--reps", type=int, default=5, help="timed client steps per measurement (median)")
    parser.add_argument("--conv-reps", type=int, default=2, help="timed client steps per Conv4 measurement")
    parser.add_argument("--out", default="algorithms", help="results/<out>.json")
    args = parser.parse_args()
    quiet = wait_quiet()
    info = machine()
    results: dict[str, Any] = {}
    print(f"{'workload':<9} {'algorithm':<10} {'vmap ms':>9} {'loop ms':>9} {'vmap MB':>8} {'loop MB':>8}  faster")
    for workload in args.workloads.split(","):
        tasks = args.conv_tasks if workload == "conv4" else args.sinusoid_tasks
        reps = args.conv_reps if workload == "conv4" else args.reps
        for algorithm in args.algorithms.split(","):
            row: dict[str, Any] = {"tasks": tasks}
            modes = ["loop"] if algorithm in SEQUENTIAL else ["vmap", "loop"]
            for mode in modes:
                row[mode] = measure(workload, algorithm, mode == "vmap", tasks, reps)
            times = {m: row[m].get("median_ms") for m in modes if "median_ms" in row[m]}
            row["faster"] = min(times, key=lambda m: times[m]) if times else None
            results.setdefault(workload, {})[algorithm] = row

            def cell(mode: str, key: str) -> str:
                value = row.get(mode, {}).get(key)
                return f"{value:.1f}" if isinstance(value, float) else "-"

            print(f"{workload:<9} {algorithm:<10} {cell('vmap', 'median_ms'):>9} {cell('loop', 'median_ms'):>9} "
                  f"{cell('vmap', 'step_peak_mb'):>8} {cell('loop', 'step_peak_mb'):>8}  {row['faster']}", flush=True)
    path = write_result(args.out, {"machine": info, "quiet": quiet, "settings": vars(args), "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
