"""Accuracy of each Conv4 normalisation on Omniglot, in a batch of queries and one query at a time.

Trains `--rounds` centralised meta-steps (one data holder holding every training class,
`--tasks` tasks a step, 5-way 1-shot, 5 queries per class, one inner step at lr 0.4), then
evaluates `--eval-tasks` held-out tasks (5 queries per class, `--eval-steps` adaptation
steps): accuracy with each task's queries predicted together (`acc_batch`) and with every
query predicted alone (`acc_alone`). An inductive norm gives the same two numbers; the
transductive one ("batch") does not. One thread, as a local client uses.

    python benchmarks/conv4_norms.py --data-dir /work/shared/data/omniglot --algorithm protonet --norm support
    for n in support group layer batch; do python benchmarks/conv4_norms.py --data-dir D --norm $n; done
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedmeta.common import centralized
from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import evaluate, predict
from fedmeta.common.models import NORMS, build_model, default_model
from fedmeta.common.tasks import STREAM_EVAL, loss_for, make_tasks, task_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--algorithm", default="protonet")
    parser.add_argument("--norm", default=NORMS[0], choices=NORMS)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    algo = get_algorithm(args.algorithm)
    run = RunConfig(run_id="norms", algorithm=args.algorithm, task="omniglot", seed=args.seed,
                    model=default_model("omniglot", ways=5, algorithm=args.algorithm, norm=args.norm),
                    shots=1, queries=5, tasks_per_client=args.tasks, inner_steps=1, inner_lr=0.4, rounds=args.rounds,
                    eval_shots=1, eval_steps=args.eval_steps, eval_queries=5, shards=1, ways=5)
    started = time.perf_counter()
    params = centralized.train(run, outer_lr=algo.default_outer_lr, data_seeds=[0], vectorize=False,
                               data_dir=args.data_dir)
    trained = time.perf_counter()
    model = build_model(run.model)
    loss_fn = loss_for(run.task)
    tasks = make_tasks(run, data_seed=0, shard=0, data_dir=args.data_dir)
    batch = tasks.sample("eval", num_tasks=args.eval_tasks, shots=1, queries=5,
                         seed=task_seed(run.seed, 0, STREAM_EVAL, 0))
    together = evaluate(algo, model, params, batch, loss_fn, steps=run.eval_steps, lr=run.inner_lr,
                        vectorize=False, classification=True, curve_tasks=0)
    correct = total = 0
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t]
        adapted = algo.adapt(model, params, xs, ys, loss_fn, steps=run.eval_steps, lr=run.inner_lr)
        with torch.no_grad():
            for i in range(xq.shape[0]):
                correct += int(predict(algo, model, adapted, xs, ys, xq[i:i + 1]).argmax(-1).item() == yq[i].item())
                total += 1
    print(json.dumps({"algorithm": args.algorithm, "norm": args.norm, "rounds": args.rounds, "seed": args.seed,
                      "eval_tasks": args.eval_tasks, "acc_batch": round(together["accuracy_post"], 4),
                      "acc_alone": round(correct / total, 4), "train_s": round(trained - started, 1),
                      "eval_s": round(time.perf_counter() - trained, 1)}), flush=True)


if __name__ == "__main__":
    main()
