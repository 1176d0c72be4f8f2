"""Omniglot on real images: every algorithm federated beside centralised, 5-way and 20-way 1-shot.

The split (non-IID, test alphabets no client ever saw):

  train  the 5 alphabets of images_background_small1.zip, one per client (--partition alphabet,
         --shards 5: Balinese, Early_Aramaic, Greek, Korean, Latin)
  test   the alphabets of images_background_small2.zip that small1 lacks (Japanese (katakana),
         Sanskrit, Tagalog), given to the loader as the evaluation archive

Each row is a real run of `python -m fedmeta.server` (a coordinator and 5 client processes on
127.0.0.1 for `federated`; the same algorithm, tasks and budget in one process for
`centralized`), evaluated inductively (Conv4's default normalisation, no batch statistics of
the query set) on 600 held-out tasks (5 clients x 120) with a 95% CI. FedAvg is the baseline
that learns no initialisation for adaptation: its row is FedAvg + fine-tuning.

    python benchmarks/omniglot.py --data-dir ../shared/data/omniglot                 # every row
    python benchmarks/omniglot.py --data-dir ../shared/data/omniglot --algorithms protonet --settings 5w1s
    python benchmarks/omniglot.py --table                                              # README table from the JSON
    python benchmarks/omniglot.py --data-dir ../shared/data/omniglot --algorithms protonet --settings 5w1s \
        --modes federated --eval-every 50 --results omniglot_curve   # a validation curve, kept out of the table

Results accumulate in benchmarks/results/omniglot.json (one entry per algorithm, setting and
mode; a rerun of a row replaces it), so rows can be run in several sittings. With --eval-every
N, a row also records its validation accuracy every N rounds (held-out classes of the training
alphabets, neither trained on nor tested), the wall time it was reached at, and the best round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, ROOT, machine, write_result  # noqa: E402

SMALL1 = "images_background_small1.zip"
SMALL2 = "images_background_small2.zip"
TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
CLIENTS = 5
EVAL_TASKS_PER_CLIENT = 120  # x 5 clients = 600 test tasks

SETTINGS = {"5w1s": {"ways": 5, "shots": 1}, "20w1s": {"ways": 20, "shots": 1}}
ALGORITHMS = ("protonet", "matchingnet", "relationnet", "maml", "fomaml", "reptile", "anil", "metasgd", "metacurvature",
              "fedavg")

# The training budget per algorithm (the same for both modes): rounds, tasks per client per
# round, and what differs from the defaults. ProtoNets train 20-way for 5-way tests (Snell et
# al. 2017) where --eval-ways allows it; gradient-based methods train on the test's ways.
BUDGET: dict[str, dict[str, Any]] = {
    "protonet": {"rounds": 400, "tasks": 2, "flags": [], "train_ways": 20},
    # Matching and Relation Nets train on the test's ways (Vinyals et al. 2016, Sung et al. 2018); plain
    # matching (FCE gains little on Omniglot, their Table 1), the relation module with the paper's MSE.
    "matchingnet": {"rounds": 400, "tasks": 2, "flags": []},
    "relationnet": {"rounds": 400, "tasks": 2, "flags": []},
    "maml": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "1", "--eval-steps", "10"]},
    "fomaml": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "1", "--eval-steps", "10"]},
    "reptile": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "5", "--inner-lr", "0.1", "--eval-steps", "10"]},
    "anil": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "1", "--eval-steps", "10"]},
    "metasgd": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "1"]},
    "metacurvature": {"rounds": 300, "tasks": 2, "flags": ["--inner-steps", "1"]},
    "fedavg": {"rounds": 300, "tasks": 2, "flags": ["--eval-steps", "10", "--inner-lr", "0.1"]},
}


def make_split(data_dir: Path, workdir: Path) -> Path:
    """A data folder holding small1 as the background archive and small2's new alphabets as evaluation."""
    for name in (SMALL1, SMALL2):
        if not (data_dir / name).is_file():
            raise SystemExit(f"--data-dir {data_dir}: expected {name} there (the small Omniglot archives from "
                             "https://github.com/brendenlake/omniglot, python/)")
    split = workdir / "omniglot-split"
    split.mkdir(parents=True, exist_ok=True)
    background = split / SMALL1
    if not background.exists():
        os.symlink((data_dir / SMALL1).resolve(), background)
    evaluation = split / "images_evaluation_small2_new_alphabets.zip"
    if not evaluation.exists():
        with zipfile.ZipFile(data_dir / SMALL2) as src, zipfile.ZipFile(evaluation, "w") as dst:
            for info in src.infolist():
                parts = info.filename.split("/")
                if len(parts) >= 2 and parts[1] in TEST_ALPHABETS:
                    dst.writestr(info, src.read(info))
    return split


def run_row(algorithm: str, setting: str, mode: str, split: Path, workdir: Path, *, budget_scale: float,
            threads: int, device: str = "cpu", eval_every: int = 0) -> dict[str, Any]:
    s = SETTINGS[setting]
    b = BUDGET[algorithm]
    rounds = max(1, round(b["rounds"] * budget_scale))
    run_dir = workdir / f"{algorithm}-{setting}-{mode}"
    cmd = [sys.executable, "-m", "fedmeta.server", "--task", "omniglot", "--data-dir", str(split), "--algorithm", algorithm,
           "--mode", mode, "--local-clients", str(CLIENTS), "--shards", str(CLIENTS), "--partition", "alphabet",
           "--ways", str(max(s["ways"], b.get("train_ways", 0))), "--eval-ways", str(s["ways"]),
           "--shots", str(s["shots"]), "--eval-shots", str(s["shots"]),
           "--rounds", str(rounds), "--tasks-per-client", str(b["tasks"]),
           "--eval-tasks-per-client", str(EVAL_TASKS_PER_CLIENT), "--run-dir", str(run_dir), "--no-progress",
           # the evaluation round waits for all 5 clients (120 tasks each take up to a minute on 2
           # cores), not the 30 s default deadline, which closed one row with 4 of them (480 tasks)
           "--round-deadline-s", "600", "--seed", "0", *b["flags"]]
    if device != "cpu" and mode == "federated":
        cmd += ["--local-device", device]
    if eval_every:
        cmd += ["--eval-every", str(eval_every)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=4 * 3600)
    finally:
        if proc.poll() is None:  # interrupted or timed out: the coordinator stops its local clients on SIGTERM
            proc.terminate()
            proc.wait(timeout=60)
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    elapsed = time.monotonic() - start
    command = "python -m fedmeta.server " + " ".join(cmd[3:]).replace(str(split), "SPLIT").replace(str(run_dir), "RUN")
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "command": command}
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval"]
    if ev["tasks"] < CLIENTS * EVAL_TASKS_PER_CLIENT:
        return {"error": f"evaluated on {ev['tasks']} tasks, not {CLIENTS * EVAL_TASKS_PER_CLIENT}", "command": command}
    out = {
        "algorithm": algorithm, "setting": setting, "mode": mode, "device": device if mode == "federated" else "cpu",
        "accuracy": ev["accuracy_post"], "accuracy_pre": ev["accuracy_pre"], "ci95": ev.get("ci95"),
        "eval_tasks": ev["tasks"], "eval_ways": ev.get("ways"), "eval_steps": ev.get("steps"),
        "transductive_bn": ev.get("transductive_bn"), "rounds": summary["rounds_completed"],
        "wall_s": summary["wall_s"], "process_s": elapsed, "eval_s": summary.get("eval_s"),
        "bytes_moved": summary["bytes_sent"] + summary["bytes_received"],
        "command": command,
    }
    if eval_every:
        out["validation"] = validation_curve(run_dir / "metrics.jsonl")
        out["best"] = summary.get("best")
    return out


def validation_curve(metrics: Path) -> list[dict[str, Any]]:
    """The run's validations in order: rounds trained, accuracy and its CI, tasks, wall seconds."""
    curve = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "validation":
            curve.append({"rounds_trained": record["rounds_trained"], "accuracy": record["val_value"],
                          "ci95": record["val_ci95"], "tasks": record["val_tasks"], "wall_s": record["wall_s"]})
    return curve


def load_rows(name: str = "omniglot") -> dict[str, dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()).get("rows", {}))


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per algorithm and setting, federated beside centralised."""
    lines = ["| algorithm | setting | federated: accuracy ± 95% CI | wall s | MB moved | centralised: accuracy ± 95% CI | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for algorithm in ALGORITHMS:
        for setting in SETTINGS:
            fed = rows.get(f"{algorithm}/{setting}/federated")
            cen = rows.get(f"{algorithm}/{setting}/centralized")
            if fed is None and cen is None:
                continue

            def acc(r: dict[str, Any] | None) -> str:
                if r is None:
                    return "not run"
                if "error" in r:
                    return "error"
                return f"{r['accuracy']:.3f} ± {r['ci95']:.3f}"

            def cell(r: dict[str, Any] | None, key: str, scale: float = 1.0) -> str:
                return f"{r[key] / scale:.0f}" if r and key in r else ""

            name = "fedavg + fine-tuning" if algorithm == "fedavg" else algorithm
            lines.append(f"| `{name}` | {setting} | {acc(fed)} | {cell(fed, 'wall_s')} | {cell(fed, 'bytes_moved', 1e6)} "
                         f"| {acc(cen)} | {cell(cen, 'wall_s')} |")
    return "\n".join(lines)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the children's clean-up on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="folder with images_background_small1.zip and _small2.zip")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="5w1s, 20w1s")
    parser.add_argument("--modes", default="federated,centralized")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every row's rounds (a quick look: 0.1)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (default: torch's)")
    parser.add_argument("--device", default="cpu", help="--local-device of the federated rows: cpu, cuda, cuda:all")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="validate every N rounds and record the curve in each row (default: 0, never)")
    parser.add_argument("--results", default="omniglot",
                        help="benchmarks/results/NAME.json the rows accumulate in (default: omniglot, the README's table)")
    parser.add_argument("--table", action="store_true", help="print the README table from the results JSON and exit")
    args = parser.parse_args()
    if args.eval_every < 0 or not args.results.replace("_", "").isalnum():
        parser.error("--eval-every: expected N >= 0; --results: a name of letters, digits and _")
    rows = load_rows(args.results)
    if args.table:
        print(table(rows))
        return 0
    if args.data_dir is None:
        parser.error("--data-dir: required unless --table")
    unknown = set(args.algorithms.split(",")) - set(ALGORITHMS) | set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}: algorithms {list(ALGORITHMS)}, settings {list(SETTINGS)}")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="fedmeta-omniglot-") as tmp:
        split = make_split(args.data_dir.resolve(), Path(tmp))
        for algorithm in args.algorithms.split(","):
            for setting in args.settings.split(","):
                for mode in args.modes.split(","):
                    r = run_row(algorithm, setting, mode, split, Path(tmp), budget_scale=args.budget_scale,
                                threads=args.threads, device=args.device, eval_every=args.eval_every)
                    rows[f"{algorithm}/{setting}/{mode}"] = r
                    if "error" in r:
                        print(f"{algorithm:<9} {setting:<6} {mode:<12} error: {r['error']}", flush=True)
                    else:
                        print(f"{algorithm:<9} {setting:<6} {mode:<12} {r['accuracy']:.3f} ± {r['ci95']:.3f} "
                              f"({r['eval_tasks']} tasks)  {r['wall_s']:.0f} s  {r['bytes_moved'] / 1e6:.0f} MB", flush=True)
                    write_result(args.results, {"machine": info, "settings": vars(args) | {"data_dir": str(args.data_dir)},
                                              "split": {"train": SMALL1, "test_alphabets": TEST_ALPHABETS,
                                                        "clients": CLIENTS, "eval_tasks": CLIENTS * EVAL_TASKS_PER_CLIENT},
                                              "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
