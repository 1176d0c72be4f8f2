"""Two task families that pull θ apart: plain mean vs task-aware aggregation vs --clusters 2.

A federation of sinusoid clients from two families (common/tasks/sinusoid.py): --clients-a
draw phases in [0, pi/2], --clients-b in [pi, 3 pi/2] (a "b" task is minus an "a" task).
Each configuration trains MAML (1 inner step, 10 tasks per client per round, Adam 3e-3) for
--rounds rounds with the coordinator's own pieces, in this process: the round aggregator
(common/round_aggregator.py: mean, task-aware, clusters around either), the clients' cluster
choice and slice (common/clusters.py), the guarded outer step that leaves idle clusters as
they were, and the split from --cluster-warmup on. No gRPC: the integration tests
(tests/integration/test_clusters_run.py) run the same code through real processes.

Then each group is tested on --tasks held-out tasks of its own family, each a new holder
with 5 shots: under clusters it is assigned, per task, the cluster whose θ adapts best on its
support set (IFCA's rule, as fedmeta-adapt does), then adapted 10 SGD steps (lr 0.01) and
scored by MSE on 100 queries. Reported: mean MSE and its 95% CI per group, and under clusters
the share of held-out tasks assigned to their group's training cluster.

    python benchmarks/two_families.py --rounds 300 --tasks 600
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, write_result  # noqa: E402
from fedmeta.common.aggregation import FlatLayout  # noqa: E402
from fedmeta.common.algorithms import InnerConfig, OuterConfig, get_algorithm, meta_parameters  # noqa: E402
from fedmeta.common.algorithms.inner import forward, map_tasks  # noqa: E402
from fedmeta.common.clusters import ClusteredAggregator, choose, embed, guarded_cluster_step, split, stack  # noqa: E402
from fedmeta.common.config import RunConfig  # noqa: E402
from fedmeta.common.evaluation import ci95  # noqa: E402
from fedmeta.common.models import build_model  # noqa: E402
from fedmeta.common.round_aggregator import make_round_aggregator  # noqa: E402
from fedmeta.common.tasks import STREAM_EVAL, STREAM_TRAIN, loss_for, task_seed  # noqa: E402
from fedmeta.common.tasks.sinusoid import SinusoidTasks  # noqa: E402

CONFIGS = (("mean", 1), ("task-aware", 1), ("mean", 2), ("task-aware", 2))


def train(aggregator: str, k: int, families: list[str], args: argparse.Namespace) -> tuple[dict[str, torch.Tensor],
                                                                                          dict[str, Any]]:
    """θ (stacked under clusters) after --rounds rounds, and what the run did (split round, memberships)."""
    run = RunConfig(run_id="two-families", algorithm="maml", task="sinusoid", rounds=args.rounds, clusters=k,
                    tasks_per_client=10, seed=args.seed)
    algorithm, loss_fn = get_algorithm("maml"), loss_for("sinusoid")
    model = build_model(run.model)
    params = stack(meta_parameters(run, run.seed), k)
    layout = FlatLayout.of(params)
    theta = layout.flatten(params)
    outer = algorithm.make_outer(OuterConfig(lr=3e-3, rounds=args.rounds))
    tasks = [SinusoidTasks(f) for f in families]
    split_round, members = None, [0] * len(families)
    for r in range(args.rounds):
        joint = split_round is None
        agg = make_round_aggregator(aggregator, layout, clusters=k, joint=joint,
                                    try_split=joint and r >= args.cluster_warmup)
        inner = InnerConfig.from_run(run, round_index=r)
        for i, family in enumerate(tasks):
            batch = family.sample("train", num_tasks=10, shots=5, queries=10,
                                  seed=task_seed(run.seed, i, STREAM_TRAIN, r))
            thetas = split(layout.views(theta), k)
            j, _ = choose(algorithm, model, thetas, batch, loss_fn, steps=1, lr=run.inner_lr)
            update = algorithm.client_step(model, thetas[j], batch, loss_fn, inner)
            agg.add(embed(update.tensors, j, thetas) if k > 1 else update.tensors, update.weight)
            members[i] = j
        mean = agg.take_mean()
        idle = agg.idle if isinstance(agg, ClusteredAggregator) else []
        guarded_cluster_step(outer, theta, mean, r, idle)
        if isinstance(agg, ClusteredAggregator) and agg.split_now and agg.groups is not None:
            split_round = r
            members = [g for i in range(len(families)) for g, grp in enumerate(agg.groups) if i in grp]
    return {n: v.clone() for n, v in layout.views(theta).items()}, {"split_round": split_round,
                                                                    "last_cluster_of_client": members}


def test(theta: dict[str, torch.Tensor], k: int, family: str, args: argparse.Namespace) -> dict[str, Any]:
    """MSE after 10 adaptation steps on --tasks held-out tasks of one family; per task, the best-adapting cluster."""
    algorithm, loss_fn = get_algorithm("maml"), loss_for("sinusoid")
    model = build_model(RunConfig(run_id="x").model)
    batch = SinusoidTasks(family).sample("eval", num_tasks=args.tasks, shots=5, queries=100,
                                         seed=task_seed(args.seed, 10_000 + ord(family), STREAM_EVAL, 0))

    def scores(p, xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        adapted = algorithm.adapt(model, p, xs, ys, loss_fn, steps=10, lr=0.01)
        return torch.stack([loss_fn(forward(model, adapted, xs, xs), ys), loss_fn(forward(model, adapted, xq, xs), yq)])

    per = torch.stack([map_tasks(scores, {n: v for n, v in t.items()}, batch).detach().double()
                       for t in split(theta, k)])  # [k, tasks, (support, query)]
    chosen = per[:, :, 0].argmin(dim=0)
    mse = per[chosen, torch.arange(args.tasks), 1]
    mean, mean_sq = float(mse.mean()), float((mse**2).mean())
    out: dict[str, Any] = {"mse": mean, "ci95": ci95(mean, mean_sq, args.tasks), "tasks": args.tasks}
    if k > 1:
        out["assigned_to_cluster"] = torch.bincount(chosen, minlength=k).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=600, help="held-out tasks per group")
    parser.add_argument("--clients-a", type=int, default=5)
    parser.add_argument("--clients-b", type=int, default=3)
    parser.add_argument("--cluster-warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    at_start = machine()
    families = ["a"] * args.clients_a + ["b"] * args.clients_b
    results: dict[str, Any] = {}
    for aggregator, k in CONFIGS:
        name = aggregator if k == 1 else f"{aggregator} + clusters {k}"
        start = time.perf_counter()
        theta, info = train(aggregator, k, families, args)
        row: dict[str, Any] = {"train_s": round(time.perf_counter() - start, 1), **info}
        for family in ("a", "b"):
            row[family] = test(theta, k, family, args)
            if k > 1:  # the cluster the group's training clients ended in, and how many held-out tasks went there
                trained = [c for c, f in zip(info["last_cluster_of_client"], families) if f == family]
                home = max(set(trained), key=trained.count)
                row[family]["home_cluster"] = home
                row[family]["assigned_home"] = row[family]["assigned_to_cluster"][home] / args.tasks
        results[name] = row
        print(f"{name:<26} a: MSE {row['a']['mse']:.3f} ± {row['a']['ci95']:.3f}   "
              f"b: MSE {row['b']['mse']:.3f} ± {row['b']['ci95']:.3f}   ({row['train_s']} s)", flush=True)
    write_result("two_families", {"settings": vars(args), "families": {"a": "phase U[0, pi/2]",
                                                                          "b": "phase U[pi, 3 pi/2]"},
                                  "results": results, "machine": at_start})
    if not all(math.isfinite(r[f]["mse"]) for r in results.values() for f in ("a", "b")):
        sys.exit("a configuration diverged")


if __name__ == "__main__":
    main()
