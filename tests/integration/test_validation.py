"""Validation during training (--eval-every) with real processes: the curve, the best θ, both exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

SETTINGS = ["--task", "gaussian", "--rounds", "12", "--eval-every", "4", "--val-tasks-per-client", "10",
            "--tasks-per-client", "4", "--eval-tasks-per-client", "10", "--inner-lr", "0.1", "--outer-lr", "0.01"]


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "round" in r], [r for r in lines if r.get("event") == "validation"]


def _version(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {})["parameter_version"]


def _check_run(run_dir: Path, *, val_tasks: int) -> None:
    rounds, vals = _records(run_dir)
    assert [r["round"] for r in rounds] == list(range(12))
    assert [v["rounds_trained"] for v in vals] == [4, 8, 12]
    assert all(v["val_metric"] == "accuracy" and 0.0 <= v["val_value"] <= 1.0 for v in vals)
    assert all(v["val_tasks"] == val_tasks and v["val_ci95"] > 0 for v in vals)
    # The best flag marks each new maximum; the summary names the overall one.
    best_so_far = -1.0
    for v in vals:
        assert v["best"] == (v["val_value"] > best_so_far)
        best_so_far = max(best_so_far, v["val_value"])
    best = max(vals, key=lambda v: (v["val_value"], -v["rounds_trained"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["rounds_trained"] == best["rounds_trained"]
    assert summary["best"]["value"] == pytest.approx(best["val_value"])
    # model/ is the last θ, model-best/ the best-validation θ, each with what adapt needs.
    assert _version(run_dir / "model" / "model.safetensors") == summary["parameter_version"]
    assert _version(run_dir / "model-best" / "model.safetensors") == best["version"]
    assert json.loads((run_dir / "model-best" / "model.json").read_text())["parameter_version"] == best["version"]
    assert (run_dir / "model-best" / "model.safetensors").resolve() == Path(summary["best"]["model"]).resolve()


def test_federated_validation_curve_and_best_model(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--clients-per-round", "2", "--min-clients", "2", *SETTINGS)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
    assert server.wait(180) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    _check_run(run_dir, val_tasks=20)
    out = server.output()
    assert "validation after 4 rounds on 20 tasks: accuracy" in out
    assert "Best validation accuracy" in out and "model-best/" in out


def test_centralized_validation_matches_the_format(tmp_path: Path) -> None:
    run_dir = tmp_path / "central"
    done = subprocess.run([sys.executable, "-m", "fedmeta.server", "--mode", "centralized", "--local-clients", "2",
                           "--run-dir", str(run_dir), "--no-progress", *SETTINGS],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    _check_run(run_dir, val_tasks=20)
