"""The final evaluation's settings: --eval-ways, the curve on a subset of tasks, ProtoNets without steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn.functional as F

from fedmeta.common.algorithms import get_algorithm, meta_parameters
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import _tasks, evaluate, evaluate_holder
from fedmeta.common.models import ModelSpec, build_model
from fedmeta.common.tasks import STREAM_EVAL, TaskBatch, make_tasks, task_seed
from fedmeta.server.report import eval_summary
from fedmeta.server.rundir import RunDir

ENCODER = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": 8})


class Recording:
    """A real Gaussian task family that remembers the batches it gave out."""

    classification = True

    def __init__(self, run: RunConfig) -> None:
        self.family = make_tasks(run, data_seed=0)
        self.batches: list[TaskBatch] = []

    def sample(self, split, **kwargs):  # type: ignore[no-untyped-def]
        batch = self.family.sample(split, **kwargs)
        self.batches.append(batch)
        return batch


def test_protonet_trained_20_way_is_tested_5_way() -> None:
    run = RunConfig(run_id="r", algorithm="protonet", task="gaussian", model=ENCODER, ways=20, eval_ways=5, dim=4,
                    eval_shots=2, eval_queries=3, eval_tasks_per_client=4)
    tasks = Recording(run)
    metrics = evaluate_holder(get_algorithm("protonet"), build_model(ENCODER), meta_parameters(run, 0), tasks, run,
                              data_seed=0, vectorize=False)
    assert tasks.batches and all(int(b.y_support.max()) == 4 for b in tasks.batches)  # labels 0..4: 5 ways
    main = tasks.batches[0]
    assert main.x_support.shape == (4, 5 * 2, 4) and main.x_query.shape == (4, 5 * 3, 4)
    assert 0.0 <= metrics["accuracy_post"] <= 1.0
    assert metrics["accuracy_pre"] == metrics["accuracy_post"]  # no adaptation: measured once
    assert not any(k.startswith("curve_") for k in metrics)  # ProtoNets take no steps: no curve
    summary = eval_summary(run, metrics, 4.0, {"c": {"tasks": 4.0, **metrics}})
    assert summary["ways"] == 5 and summary["train_ways"] == 20 and summary["steps"] == 0
    assert "curve" not in summary and "curve" not in summary["per_client"]["c"]


def test_a_head_cannot_be_tested_with_other_ways() -> None:
    with pytest.raises(ValueError, match="^--eval-ways 5: maml adapts a head with --ways 20"):
        RunConfig(run_id="r", algorithm="maml", task="gaussian", ways=20, eval_ways=5)


def test_the_export_records_training_and_test_ways(tmp_path: Path) -> None:
    run = RunConfig(run_id="r", algorithm="protonet", task="gaussian", model=ENCODER, ways=20, eval_ways=5, dim=4)
    RunDir(tmp_path).export_model(meta_parameters(run, 0), run, "v0")
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["ways"] == {"train": 20, "eval": 5}
    assert meta["run"]["eval_ways"] == 5 and meta["adapt"]["steps"] == 0  # ProtoNets: no adaptation steps


def test_the_curve_and_pre_are_on_the_first_tasks_post_on_all() -> None:
    run = RunConfig(run_id="r", algorithm="maml", task="gaussian", model=ModelSpec("mlp", {
        "in_features": 4, "hidden": [16], "out_features": 3}), ways=3, dim=4, inner_lr=0.3)
    batch = make_tasks(run).sample("eval", num_tasks=8, shots=2, queries=4, seed=task_seed(0, 0, STREAM_EVAL, 0))
    algo, model, params = get_algorithm("maml"), build_model(run.model), meta_parameters(run, 0)

    def ev(b: TaskBatch, curve_tasks: int | None):  # type: ignore[no-untyped-def]
        return evaluate(algo, model, params, b, F.cross_entropy, steps=3, lr=0.3, vectorize=False,
                        classification=True, curve_tasks=curve_tasks)

    full, sub, first = ev(batch, None), ev(batch, 3), ev(_tasks(batch, 0, 3), None)
    assert (full["curve_tasks"], full["pre_tasks"]) == (8, 8) and (sub["curve_tasks"], sub["pre_tasks"]) == (3, 3)
    assert sub["accuracy_post"] == pytest.approx(full["accuracy_post"], abs=1e-6)  # post: every task
    assert sub["loss_post_sq"] == pytest.approx(full["loss_post_sq"], rel=1e-5)
    for k in ("accuracy_pre", "loss_pre", *(f"curve_{i}" for i in range(4))):
        assert sub[k] == pytest.approx(first[k], abs=1e-6), k  # pre and the curve: the first 3 tasks
    assert sub["curve_3"] == pytest.approx(first["accuracy_post"], abs=1e-6)
    none = ev(batch, 0)
    assert not any(k.startswith("curve_") for k in none) and none["pre_tasks"] == 8
    assert none["accuracy_pre"] == pytest.approx(full["accuracy_pre"], abs=1e-6)
    summary = eval_summary(run, sub, 8.0, {"c": {"tasks": 8.0, **sub}})
    assert summary["curve_tasks"] == 3 and summary["pre_tasks"] == 3 and len(summary["curve"]) == 4
