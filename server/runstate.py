"""What a run keeps across rounds and restarts: resume, checkpoint metadata, best validation, records.

A checkpoint holds θ, the outer optimiser state and `meta`: next round, version, bytes and
wall time so far, the client registry (bounded by --max-clients), the rounds validated
through, the best validation, and the run's settings, which must match to resume
(check_resumable), and under --clusters the round the clusters split at. Sampling is a pure function of (seed, round, attempt): no generator
state to save.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedmeta.common.algorithms.base import OuterStep
from fedmeta.common.clusters import ClusterState
from fedmeta.server import checkpoint, report, validation
from fedmeta.server.config import ServerConfig, describe, resume_differences
from fedmeta.server.registry import Registry
from fedmeta.server.rounds import Round, RoundsState
from fedmeta.server.rundir import RunDir
from fedmeta.server.trackers import Sink
from fedmeta.server.validation import Best

log = logging.getLogger("fedmeta.coordinator")

def check_resumable(stored: Mapping[str, Any], current: Mapping[str, Any], run_dir: str) -> None:
    """Refuse to resume a checkpoint written with other settings (ValueError naming them).

    Which settings must match is declared once, on the settings (resume=True); a checkpoint
    from before a setting existed compares with its default.
    """
    stored = dict(stored)
    model = stored.get("model")
    if isinstance(model, dict) and model.get("name") == "conv4" and "norm" not in (model.get("kwargs") or {}):
        # Conv4 before --norm: transductive batch norm. Resuming needs --norm batch.
        stored["model"] = {**model, "kwargs": {**(model.get("kwargs") or {}), "norm": "batch"}}
    differ = resume_differences(stored, dict(current))
    if differ:
        raise ValueError(f"--run-dir {run_dir} holds a run with other settings ({', '.join(differ)}); "
                         "pass the same settings to resume or choose a new --run-dir")


class RunState:
    """Counters, timing and the best validation of a run, and its files (through RunDir)."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.run = config.run
        self.rundir = RunDir(config.run_dir)
        self.clock = clock
        self._bytes_lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wall_before = 0.0
        self.started = clock()
        self.best: Best | None = None
        # What sees every record after metrics.jsonl: telemetry, TensorBoard, MLflow (server/trackers.py).
        self.sinks: list[Sink] = []
        self.resumed_meta: Mapping[str, Any] = {}  # the checkpoint's meta a resume started from

    @property
    def wall_s(self) -> float:
        return self.wall_before + self.clock() - self.started

    def count_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        with self._bytes_lock:
            self.bytes_sent += sent
            self.bytes_received += received

    # ---- resume and checkpoints ----------------------------------------------------------------
    def resume(self, *, numel: int, version_of: Callable[[torch.Tensor], str], outer: OuterStep,
               registry: Registry, rounds: RoundsState, clusters: ClusterState | None = None) -> torch.Tensor | None:
        """Load the last checkpoint into outer, registry and rounds; returns its θ, or None for a new run."""
        self.rundir.check_not_finished()
        state = checkpoint.load(self.rundir.checkpoint_dir, version_of=version_of)
        if state is None:
            self.rundir.create(describe(self.config))
            return None
        check_resumable(state.meta.get("config", {}), describe(self.config), str(self.config.run_dir))
        if state.theta.numel() != numel:
            raise ValueError(f"checkpoint in {self.config.run_dir} does not match the model's size")
        outer.load_state_dict(state.outer)
        meta = state.meta
        self.resumed_meta = meta
        rounds.next_round = int(meta["next_round"])
        rounds.validated_through = int(meta.get("validated_through", 0))
        self.bytes_sent = int(meta.get("bytes_sent", 0))
        self.bytes_received = int(meta.get("bytes_received", 0))
        self.wall_before = float(meta.get("wall_s", 0.0))
        self.best = Best.from_json(meta.get("best"))
        revoked = meta.get("revoked", [])
        registry.revoked = {r for r in revoked if isinstance(r, str)} if isinstance(revoked, list) else set()
        if clusters is not None:
            clusters.split_round = ClusterState.from_json(meta.get("clusters")).split_round
        seen = meta.get("clients_seen", 0)
        registry.restore(meta.get("clients", {}), len(seen) if isinstance(seen, list) else int(seen),  # a list in older checkpoints
                         self.clock())
        dropped = self.rundir.trim_metrics(rounds.next_round)
        if dropped:
            log.warning("dropped %d records of rounds after the checkpoint from metrics.jsonl: those rounds are "
                        "trained again", dropped)
        log.info("resumed run %s from its checkpoint: next round %d of %d, %d clients known",
                 self.run.run_id, rounds.next_round, self.config.rounds, len(registry.clients))
        return state.theta.clone()

    def meta(self, *, rounds: RoundsState, version: str, clients: Mapping[str, Any], seen: int,
             revoked: list[str] | None = None, clusters: ClusterState | None = None) -> dict[str, Any]:
        return {
            "revoked": revoked or [],
            "clusters": None if clusters is None else clusters.to_json(),
            "next_round": rounds.next_round,
            "version": version,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wall_s": self.wall_s,
            "clients": clients,
            "clients_seen": seen,
            "validated_through": rounds.validated_through,
            "best": None if self.best is None else self.best.to_json(),
            "config": describe(self.config),
            "rng": {"seed": self.run.seed, "round": rounds.next_round},
        }

    def save(self, theta: torch.Tensor, outer: OuterStep, meta: dict[str, Any]) -> None:
        checkpoint.save(self.rundir.checkpoint_dir, checkpoint.Checkpoint(theta, outer.state_dict(), meta),
                        keep=self.config.keep_checkpoints)

    # ---- records --------------------------------------------------------------------------------
    def record(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl, then hand it to every sink."""
        self.rundir.append_metrics(record)
        self._feed("record", record)

    def _feed(self, what: str, data: Mapping[str, Any]) -> None:
        # A tracker that fails (a full disk, an unreachable MLflow server) is dropped with one error
        # line: monitoring never stops training, and metrics.jsonl still has every record.
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(data)
            except Exception as exc:  # noqa: BLE001
                log.error("%s failed (%s: %s); no longer feeding it (metrics.jsonl has every record)",
                          type(sink).__name__, type(exc).__name__, exc)
                self.sinks.remove(sink)

    def close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.error("closing %s failed: %s", type(sink).__name__, exc)

    def round_record(self, rnd: Round, metrics: Mapping[str, float], *, lr: float | None, round_s: float,
                     version: str) -> dict[str, Any]:
        """The metrics.jsonl record of a training round."""
        return {
            "round": rnd.index,
            "seed": self.run.seed,
            "meta_loss": metrics.get("loss_post"),
            "loss_pre": metrics.get("loss_pre"),
            "clients_sampled": len(rnd.answered | rnd.sampled | rnd.dropped),
            "clients_answered": len(rnd.answered),
            "round_s": round_s,
            "client_compute_s": metrics.get("compute_s"),
            "outer_lr": lr,
            "step_undone": lr is None,
            "version": version,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wall_s": self.wall_s,
        }

    def validated(self, rnd: Round, metrics: Mapping[str, float], parameters: Mapping[str, torch.Tensor],
                  version: str) -> dict[str, Any]:
        """A validation closed: export θ to model-best/ if it is the best so far; returns its record."""
        key, _ = validation.metric(self.run)
        value = metrics.get(key, float("nan"))
        improved = validation.better(self.run, value, self.best)
        if improved:
            self.rundir.export_model(parameters, self.run, version, best=True)
            self.best = Best(rnd.index, value)
        return validation.record(self.run, rnd.index, dict(metrics), rnd.metric_weight, best=improved,
                                 wall_s=self.wall_s, version=version)

    def summary(self, rnd: Round, metrics: Mapping[str, float], parameters: Mapping[str, torch.Tensor], *,
                version: str, rounds_completed: int, clients_seen: int) -> dict[str, Any]:
        """Export the final model and write summary.json; returns the summary."""
        export = self.rundir.export_model(parameters, self.run, version)
        summary: dict[str, Any] = {
            "run_id": self.run.run_id,
            "algorithm": self.run.algorithm,
            "task": self.run.task,
            "seed": self.run.seed,
            "rounds_completed": rounds_completed,
            "clients_seen": clients_seen,
            "wall_s": self.wall_s,
            "eval_s": self.clock() - rnd.started,  # the evaluation round, from its opening to its last answer
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "parameter_version": version,
            "model": str(export),
            "mode": "federated",
            "eval": report.eval_summary(self.run, metrics, rnd.metric_weight, rnd.client_metrics),
            "config": describe(self.config),
        }
        if self.best is not None:
            key, _ = validation.metric(self.run)
            summary["best"] = {"rounds_trained": self.best.rounds_trained, "round": self.best.rounds_trained - 1,
                               "metric": key.removesuffix("_post"), "value": self.best.value,
                               "model": str(self.rundir.best_dir / "model.safetensors")}
        self.rundir.write_summary(summary)
        self._feed("summary", summary)
        return summary
