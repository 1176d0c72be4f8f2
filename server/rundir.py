"""The run directory: config.json, metrics.jsonl, checkpoint/, model/, summary.json, logs/."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.clusters import split
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import eval_steps


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunDir:
    """Paths and writers for one run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint_dir = path / "checkpoint"
        self.model_dir = path / "model"
        self.best_dir = path / "model-best"
        self.logs_dir = path / "logs"
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"

    def check_not_finished(self) -> None:
        if self.summary_path.exists():
            raise ValueError(f"--run-dir {self.path} holds a finished run (summary.json exists); choose a new --run-dir")

    def create(self, config: Mapping[str, Any]) -> None:
        self.check_not_finished()
        if self.metrics_path.exists():
            raise ValueError(f"--run-dir {self.path} has metrics but no checkpoint; choose a new --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        _write_json_atomic(self.path / "config.json", dict(config))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def trim_metrics(self, next_round: int) -> int:
        """Drop records of rounds >= next_round (redone after resuming from an older checkpoint).

        Returns how many were dropped; the file is rewritten atomically only if any were.
        """
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
                if int(rec["round"] if "round" in rec else rec["after_round"]) >= next_round:
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a kill is not a record
            kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.metrics_path)
        return dropped

    def export_model(self, params: Mapping[str, torch.Tensor], run: RunConfig, version: str, *,
                     best: bool = False) -> Path:
        """Write model/ (or, for the best-validation θ, model-best/): model.safetensors and model.json.

        Under --clusters K, model.safetensors holds the K θ's (cluster.<j>.<name>) and model.json says
        "clusters": K; each θ is also exported alone to model/cluster-<j>/.
        """
        folder = self.best_dir if best else self.model_dir
        if run.clusters > 1:
            for j, theta in enumerate(split(params, run.clusters)):
                _export(folder / f"cluster-{j}", theta, run, version, cluster=j)
        return _export(folder, params, run, version)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _write_json_atomic(self.summary_path, dict(summary))


def _export(folder: Path, params: Mapping[str, torch.Tensor], run: RunConfig, version: str, *,
            cluster: int | None = None) -> Path:
    """model.safetensors and model.json in folder: all K θ's (cluster None), or cluster j's alone."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    tmp = folder / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp), metadata={"parameter_version": version})
    os.replace(tmp, weights)
    spec = {
        "model": {"name": run.model.name, "kwargs": run.model.kwargs},
        "algorithm": run.algorithm,
        "task": run.task,
        "parameter_version": version,
        "adapt": {"steps": eval_steps(get_algorithm(run.algorithm), run), "lr": run.inner_lr, "shots": run.eval_shots},
        # Trained --ways-way, tested --eval-ways-way (ProtoNets may differ; a head has `ways` outputs).
        "ways": {"train": run.ways, "eval": run.eval_ways},
        "run": {k: v for k, v in asdict(run).items() if k != "model"},
        "clusters": run.clusters if cluster is None else 1,
    }
    if cluster is not None:
        spec["cluster"] = {"index": cluster, "of": run.clusters}
    _write_json_atomic(folder / "model.json", spec)
    return weights

