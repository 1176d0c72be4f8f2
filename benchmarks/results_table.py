"""The README's results table: every algorithm on every task it applies to, as real federated runs.

For each (algorithm, task) it runs `python -m fedmeta.server --local-clients N` (a real coordinator
and N real client processes on 127.0.0.1) with the settings below, reads summary.json and
reports the metric after adaptation with its 95% confidence interval, the metric before,
wall time and bytes moved (sent + received by the coordinator).

  gaussian   5-way 5-shot, 16-d, --rounds-gaussian rounds, inner lr 0.1, 8 tasks per client per round
  sinusoid   5-shot regression, --rounds-sinusoid rounds, the defaults (protonet, matchingnet, relationnet:
             classification only)
  both       reptile with 5 inner steps, mamlpp with 3; otherwise each algorithm's defaults

    python benchmarks/results_table.py                    # writes results/results_table.json
    python benchmarks/results_table.py --algorithms maml,fedavg --rounds-gaussian 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, machine, wait_quiet, write_result  # noqa: E402

# Settings per algorithm that differ from the defaults (inner steps for the delta methods).
EXTRA = {
    "reptile": ["--inner-steps", "5"],
    "mamlpp": ["--inner-steps", "3"],
}


def run_one(algorithm: str, task: str, rounds: int, clients: int, workdir: Path) -> dict[str, Any]:
    run_dir = workdir / f"{algorithm}-{task}"
    cmd = [sys.executable, "-m", "fedmeta.server", "--algorithm", algorithm, "--task", task, "--rounds", str(rounds),
           "--local-clients", str(clients), "--run-dir", str(run_dir), "--no-progress", "--seed", "0",
           *EXTRA.get(algorithm, [])]
    if task == "gaussian":
        cmd += ["--inner-lr", "0.1", "--tasks-per-client", "8"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "command": " ".join(cmd[1:])}
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval"]
    metric = "accuracy" if "accuracy_post" in ev else "mse"
    key = "accuracy" if metric == "accuracy" else "loss"
    return {
        "metric": metric,
        "before": ev[f"{key}_pre"],
        "after": ev[f"{key}_post"],
        "ci95": ev.get("ci95"),
        "eval_tasks": ev["tasks"],
        "rounds": summary["rounds_completed"],
        "wall_s": summary["wall_s"],
        "process_s": elapsed,
        "bytes_moved": summary["bytes_sent"] + summary["bytes_received"],
        "command": "python -m fedmeta.server " + " ".join(cmd[3:]),
    }


def main() -> int:
    from fedmeta.common.algorithms import ALGORITHMS
    from fedmeta.common.models import ENCODERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(sorted(ALGORITHMS)))
    parser.add_argument("--tasks", default="gaussian,sinusoid")
    parser.add_argument("--rounds-gaussian", type=int, default=150)
    parser.add_argument("--rounds-sinusoid", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2, help="local client processes per run")
    parser.add_argument("--out", default="results_table")
    args = parser.parse_args()
    quiet = wait_quiet()
    info = machine()
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'algorithm':<10} {'task':<9} {'before':>7} {'after':>15} {'wall s':>7} {'MB moved':>9}")
    with tempfile.TemporaryDirectory(prefix="fedmeta-results-") as tmp:
        for algorithm in args.algorithms.split(","):
            for task in args.tasks.split(","):
                if algorithm in ENCODERS and task == "sinusoid":
                    continue  # the metric-based algorithms: classification only
                rounds = args.rounds_gaussian if task == "gaussian" else args.rounds_sinusoid
                r = run_one(algorithm, task, rounds, args.clients, Path(tmp))
                rows.setdefault(algorithm, {})[task] = r
                if "error" in r:
                    print(f"{algorithm:<10} {task:<9} error: {r['error']}", flush=True)
                    continue
                print(f"{algorithm:<10} {task:<9} {r['before']:>7.3f} {r['after']:>7.3f} ± {r['ci95']:.3f} "
                      f"{r['wall_s']:>7.1f} {r['bytes_moved'] / 1e6:>9.1f}", flush=True)
    path = write_result(args.out, {"machine": info, "quiet": quiet, "settings": vars(args), "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
