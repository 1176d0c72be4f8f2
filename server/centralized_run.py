"""`fedmeta-server --mode centralized`: the same algorithm, tasks and settings in one process.

The clients' task samplers are pooled: every round takes every client's meta-batch (client
i has data seed and shard i, as `--local-clients` would), so the run is the federation with
full participation and no network. It writes the same run directory (metrics.jsonl,
model/, summary.json with "mode": "centralized") so the two can be compared directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedmeta.common import centralized
from fedmeta.common.codec import version_of
from fedmeta.server.config import ServerConfig, describe
from fedmeta.server.report import eval_summary
from fedmeta.server.local import local_client_id
from fedmeta.server import validation
from fedmeta.server.rundir import RunDir
from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.evaluation import validate_holder
from fedmeta.common.models import build_model
from fedmeta.common.tasks import make_tasks

log = logging.getLogger("fedmeta.server")


def run(config: ServerConfig, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate; return the summary (also written to summary.json)."""
    rundir = RunDir(config.run_dir)
    rundir.create(describe(config))
    seeds = list(range(config.local_clients or config.clients_per_round))
    run_cfg = config.run
    started = time.monotonic()
    last = [started]

    def record(r: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        entry = {"round": r, "seed": run_cfg.seed, "meta_loss": metrics["meta_loss"], "clients_sampled": len(seeds),
                 "clients_answered": len(seeds), "round_s": now - last[0], "wall_s": now - started}
        last[0] = now
        rundir.append_metrics(entry)
        if on_round is not None:
            on_round(entry)

    log.info("centralised run %s: %s on %s, %d rounds, the task samplers of %d clients pooled", run_cfg.run_id,
             run_cfg.algorithm, run_cfg.task, config.rounds, len(seeds))
    best: list[validation.Best | None] = [None]

    def validate(rounds_trained: int, theta: dict[str, Any]) -> None:
        """As the federation's validation rounds: the first clients_per_round holders' validation tasks."""
        if not validation.due(run_cfg, rounds_trained, config.rounds):
            return
        holders = seeds[: config.clients_per_round]
        algorithm, model = get_algorithm(run_cfg.algorithm), build_model(run_cfg.model)
        pooled: dict[str, float] = {}
        for s in holders:
            tasks = make_tasks(run_cfg, data_seed=s, shard=s, data_dir=config.data_dir)
            m = validate_holder(algorithm, model, theta, tasks, run_cfg, data_seed=s, rounds_trained=rounds_trained)
            for k, v in m.items():
                pooled[k] = pooled.get(k, 0.0) + v / len(holders)
        key, _ = validation.metric(run_cfg)
        improved = validation.better(run_cfg, pooled.get(key, float("nan")), best[0])
        if improved:
            rundir.export_model(theta, run_cfg, version_of(theta), best=True)
            best[0] = validation.Best(rounds_trained, pooled[key])
        entry = validation.record(run_cfg, rounds_trained, pooled, float(run_cfg.val_tasks_per_client * len(holders)),
                                  best=improved, wall_s=time.monotonic() - started, version=version_of(theta))
        rundir.append_metrics(entry)
        if on_round is not None:
            on_round(entry)

    params = centralized.train(run_cfg, outer_lr=config.outer_lr, data_seeds=seeds, on_round=record,
                               data_dir=config.data_dir, after_step=validate)
    per_client = {}
    eval_started = time.monotonic()
    for s in seeds:
        m = centralized.evaluate_held_out(run_cfg, params, data_seeds=[s], data_dir=config.data_dir)
        per_client[local_client_id(s)] = {"tasks": float(run_cfg.eval_tasks_per_client), **m}
    eval_s = time.monotonic() - eval_started
    pooled = {k: sum(m[k] for m in per_client.values()) / len(seeds) for k in per_client[local_client_id(seeds[0])]
              if k != "tasks"}
    version = version_of(params)
    export = rundir.export_model(params, run_cfg, version)
    summary = {
        "run_id": run_cfg.run_id,
        "algorithm": run_cfg.algorithm,
        "task": run_cfg.task,
        "seed": run_cfg.seed,
        "rounds_completed": config.rounds,
        "clients_seen": len(seeds),
        "wall_s": time.monotonic() - started,
        "eval_s": eval_s,
        "bytes_sent": 0,
        "bytes_received": 0,
        "parameter_version": version,
        "model": str(export),
        "mode": "centralized",
        "eval": eval_summary(run_cfg, pooled, float(run_cfg.eval_tasks_per_client * len(seeds)), per_client),
        "config": describe(config),
    }
    if best[0] is not None:
        key, _ = validation.metric(run_cfg)
        summary["best"] = {"rounds_trained": best[0].rounds_trained, "round": best[0].rounds_trained - 1,
                           "metric": key.removesuffix("_post"), "value": best[0].value,
                           "model": str(rundir.best_dir / "model.safetensors")}
    rundir.write_summary(summary)
    return summary
