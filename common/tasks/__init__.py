"""Task families: each samples meta-batches of few-shot tasks, seeded, as stacked tensors.

A family is built for one data holder (`make_tasks`): its data seed, its shard of a
partitioned data set, and its local data directory. `sample("train", ...)` draws from
what this holder trains on; `sample("eval", ...)` draws held-out tasks that no client
trained on (new sinusoids, new client offsets, unseen Omniglot classes), and
`sample("val", ...)` validation tasks for model selection during training, disjoint from
both (other seeds; for Omniglot, characters set aside from the training alphabets).
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.common.tasks.base import (
    CLASSIFICATION,
    PARTITIONS,
    STREAM_EVAL,
    STREAM_TRAIN,
    STREAM_VAL,
    TASKS,
    LossFn,
    Split,
    TaskBatch,
    TaskFamily,
    TaskSettings,
    default_shard,
    is_classification,
    loss_for,
    task_seed,
)

__all__ = ["CLASSIFICATION", "PARTITIONS", "STREAM_EVAL", "STREAM_TRAIN", "STREAM_VAL", "TASKS", "LossFn", "Split",
           "TaskBatch", "TaskFamily", "TaskSettings", "default_shard", "is_classification", "loss_for", "make_tasks",
           "sample_batch", "task_seed"]


def make_tasks(
    run: TaskSettings, *, data_seed: int = 0, shard: int = 0, data_dir: str | Path | None = None,
    family: str = "all",
) -> TaskFamily:
    """The task family of `run.task` as seen by one data holder.

    `shard` is taken modulo `run.shards`; `data_dir` is needed by families backed by files;
    `family` picks a sub-family (sinusoid: "a" or "b", common/tasks/sinusoid.py), "all" the whole.
    """
    if run.task == "sinusoid":
        from fedmeta.common.tasks.sinusoid import SinusoidTasks

        return SinusoidTasks(family)
    if family != "all":
        raise ValueError(f"--task-family {family}: only --task sinusoid has sub-families (a, b)")
    if run.task == "gaussian":
        from fedmeta.common.tasks.gaussian import GaussianTasks

        return GaussianTasks(ways=run.ways, dim=run.dim, client_seed=data_seed)
    if run.task == "omniglot":
        from fedmeta.common.tasks.omniglot import OmniglotTasks

        if data_dir is None:
            raise ValueError("--task omniglot: needs --data-dir, the folder holding the Omniglot archives "
                             "(images_background*.zip, images_evaluation.zip) or their extracted trees")
        return OmniglotTasks(Path(data_dir), ways=run.ways, partition=run.partition, shards=run.shards,
                             shard=shard % run.shards, seed=run.seed, rotations=run.rotations,
                             validation=run.eval_every > 0)
    raise ValueError(f"unknown task {run.task!r}: expected one of {sorted(TASKS)}")


def sample_batch(task: str, *, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
    """A training meta-batch of a family that needs no data or holder (sinusoid), for tests and benchmarks."""
    if task != "sinusoid":
        raise ValueError(f"unknown task {task!r} for sample_batch: only 'sinusoid' needs no data holder; use make_tasks")
    from fedmeta.common.tasks.sinusoid import SinusoidTasks

    return SinusoidTasks().sample("train", num_tasks=num_tasks, shots=shots, queries=queries, seed=seed)
