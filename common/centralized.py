"""The centralised reference: the same algorithm, tasks and seeds as a federation, in one process.

A federation of clients with data seeds S and full participation computes, per round r,
theta <- outer_step(theta, sum_c w_c u_c / sum_c w_c) with u_c the client step on the
batch seeded by (run seed, c, r). This module runs exactly that without a network, so
a one-client federation can be checked against it and benchmarks can compare wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedmeta.common.aggregation import FlatLayout, WeightedMean
from fedmeta.common.algorithms import InnerConfig, OuterConfig, get_algorithm, meta_parameters
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import evaluate_holder
from fedmeta.common.models import build_model
from fedmeta.common.tasks import STREAM_TRAIN, loss_for, make_tasks, task_seed


def train(
    run: RunConfig,
    *,
    outer_lr: float,
    data_seeds: Sequence[int],
    rounds: int | None = None,
    theta: dict[str, torch.Tensor] | None = None,
    vectorize: bool = True,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    data_dir: str | None = None,
    after_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run `rounds` (default run.rounds) centralised meta-steps; return the meta-parameters.

    Each data seed stands for one client (its shard is the data seed, as for local clients).
    after_step(rounds_trained, params) sees θ after every round (validation during training).
    """
    algorithm = get_algorithm(run.algorithm)
    model = build_model(run.model)
    loss_fn = loss_for(run.task)
    params = theta if theta is not None else meta_parameters(run, run.seed)
    layout = FlatLayout.of(params)
    flat = layout.flatten(params)
    total_rounds = run.rounds if rounds is None else rounds
    outer = algorithm.make_outer(OuterConfig(lr=outer_lr, rounds=run.rounds, cosine=run.cosine_outer))
    families = {s: make_tasks(run, data_seed=s, shard=s, data_dir=data_dir) for s in data_seeds}
    for r in range(total_rounds):
        acc = WeightedMean(layout)
        losses = []
        for data_seed in data_seeds:
            seed = task_seed(run.seed, data_seed, STREAM_TRAIN, r)
            batch = families[data_seed].sample("train", num_tasks=run.tasks_per_client, shots=run.shots,
                                               queries=run.queries, seed=seed)
            inner = InnerConfig.from_run(run, round_index=r, vectorize=vectorize)
            update = algorithm.client_step(model, layout.views(flat), batch, loss_fn, inner)
            acc.add(update.tensors, update.weight)
            losses.append(update.metrics["loss_post"])
        outer.step(flat, acc.take_mean(), r)
        if on_round is not None:
            on_round(r, {"meta_loss": sum(losses) / len(losses)})
        if after_step is not None:
            after_step(r + 1, layout.views(flat))
    return layout.views(flat)


def evaluate_held_out(
    run: RunConfig, params: dict[str, torch.Tensor], *, data_seeds: Sequence[int], vectorize: bool = True,
    data_dir: str | None = None,
) -> dict[str, float]:
    """The federation's final evaluation (each data seed's held-out tasks), in one process."""
    algorithm = get_algorithm(run.algorithm)
    model = build_model(run.model)
    totals: dict[str, float] = {}
    for data_seed in data_seeds:
        tasks = make_tasks(run, data_seed=data_seed, shard=data_seed, data_dir=data_dir)
        m = evaluate_holder(algorithm, model, params, tasks, run, data_seed=data_seed, vectorize=vectorize)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v / len(data_seeds)
    return totals
