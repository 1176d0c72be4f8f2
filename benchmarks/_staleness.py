"""What staleness does to a MAML meta-gradient, measured during a real MAML run on sinusoids.

A buffered update computed at θ_{t-τ} is applied at θ_t. To first order
    g(θ_{t-τ}) ≈ g(θ_t) - H (θ_t - θ_{t-τ}),
so its error grows with τ x outer lr x curvature. Measured here: a centralised MAML run
(fedmeta.common.centralized.train, the federated run's settings and Adam outer step) keeps θ
after every step; at several t, the meta-gradient on one fixed meta-batch of B tasks is
computed at θ_{t-τ} and at θ_t, for each τ; reported: their cosine, the relative error
|g_old - g_new| / |g_new|, and |θ_t - θ_{t-τ}|. The sampling-noise floor beside it: the
cosine between fresh meta-gradients at θ_t on two independent meta-batches of the size one
client sends (--tasks-per-client), averaged over noise_pairs pairs. Not a benchmark itself: benchmarks/buffered.py calls it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.algorithms import InnerConfig, get_algorithm, meta_parameters
from fedmeta.common.centralized import train
from fedmeta.common.models import build_model
from fedmeta.common.tasks import loss_for, sample_batch
from fedmeta.server.config import build


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def measure(*, steps: int, at: Sequence[int], taus: Sequence[int], batch_tasks: int, noise_pairs: int = 4,
            outer_lr: float | None = None, run_dir: str = "unused") -> dict[str, Any]:
    """Cosines of stale vs fresh meta-gradients at steps `at` of a `steps`-step MAML run."""
    values: dict[str, Any] = {"rounds": steps, "run_dir": run_dir, "local_clients": 4}
    if outer_lr is not None:
        values["outer_lr"] = outer_lr
    config = build(values)
    run = config.run
    theta0 = meta_parameters(run, run.seed)
    layout = FlatLayout.of(theta0)
    history = [layout.flatten(theta0).clone()]  # history[k]: θ after k outer steps

    def keep(rounds_trained: int, params: dict[str, torch.Tensor]) -> None:
        history.append(layout.flatten(params).clone())
    train(run, outer_lr=config.outer_lr, data_seeds=range(4), after_step=keep)
    algorithm, model, loss_fn = get_algorithm(run.algorithm), build_model(run.model), loss_for(run.task)
    inner = InnerConfig.from_run(run)

    def grad(theta: torch.Tensor, seed: int, tasks: int) -> torch.Tensor:
        batch = sample_batch("sinusoid", num_tasks=tasks, shots=run.shots, queries=run.queries, seed=seed)
        update = algorithm.client_step(model, layout.views(theta), batch, loss_fn, inner)
        return layout.flatten(update.tensors)

    rows = []
    for t in at:
        fresh = grad(history[t], 10_000 + t, batch_tasks)
        noise = statistics.fmean(_cos(grad(history[t], 20_000 + 100 * t + i, run.tasks_per_client),
                                      grad(history[t], 30_000 + 100 * t + i, run.tasks_per_client))
                                 for i in range(noise_pairs))
        for tau in taus:
            if tau > t:
                continue
            stale = grad(history[t - tau], 10_000 + t, batch_tasks)
            rows.append({"t": t, "tau": tau, "cosine": _cos(stale, fresh),
                         "relative_error": float((stale - fresh).norm() / fresh.norm()),
                         "theta_moved": float((history[t] - history[t - tau]).norm()),
                         "noise_floor_cosine": noise})
    by_tau = {}
    for tau in taus:
        picked = [r for r in rows if r["tau"] == tau]
        if picked:
            by_tau[str(tau)] = {"cosine_mean": statistics.fmean(r["cosine"] for r in picked),
                                "cosine_min": min(r["cosine"] for r in picked),
                                "relative_error_mean": statistics.fmean(r["relative_error"] for r in picked),
                                "theta_moved_mean": statistics.fmean(r["theta_moved"] for r in picked)}
    floor = statistics.fmean(r["noise_floor_cosine"] for r in rows if r["tau"] == taus[0])
    return {"settings": {"algorithm": run.algorithm, "outer_lr": config.outer_lr, "steps": steps, "at": list(at),
                         "batch_tasks": batch_tasks, "tasks_per_client": run.tasks_per_client,
                         "inner_steps": run.inner_steps, "inner_lr": run.inner_lr},
            "by_tau": by_tau, "noise_floor_cosine_mean": floor, "rows": rows}
