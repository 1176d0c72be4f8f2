"""Every algorithm on Conv4 (batch norm with batch statistics, a named head), looped and vmapped."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmeta.common.algorithms import ALGORITHMS, InnerConfig, get_algorithm, meta_parameters
from fedmeta.common.algorithms.anil import split
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import evaluate
from fedmeta.common.models import ENCODERS, Conv4, ModelSpec, build_model, head_parameters, uses_batch_statistics
from fedmeta.common.tasks import TaskBatch, loss_for

WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 2


def conv_run(algorithm: str) -> RunConfig:
    out = 8 if algorithm in ENCODERS else WAYS  # ProtoNets, Matching and Relation Nets: an embedding, not logits
    spec = ModelSpec("conv4", {"in_channels": 1, "ways": out, "hidden": 4, "image_size": 28})
    return RunConfig(run_id="c", algorithm=algorithm, task="omniglot", model=spec, ways=WAYS, shots=SHOTS,
                     queries=QUERIES, inner_steps=2, inner_lr=0.1, rounds=4, local_steps=2, local_lr=0.05)


def batch() -> TaskBatch:
    gen = torch.Generator().manual_seed(0)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1).contiguous()
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1).contiguous()
    return TaskBatch(torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=gen), ys,
                     torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=gen), yq)


def test_conv4_declares_its_head_and_its_norm() -> None:
    spec = conv_run("maml").model
    model = build_model(spec)
    assert isinstance(model, Conv4) and head_parameters(model) == ("head.weight", "head.bias")
    assert not uses_batch_statistics(model) and split(model) is not None  # support-set statistics: inductive
    transductive = build_model(dataclasses.replace(spec, kwargs=spec.kwargs | {"norm": "batch"}))
    assert uses_batch_statistics(transductive) and head_parameters(transductive) == ("head.weight", "head.bias")


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_steps_adapts_and_evaluates_on_conv4(name: str, vectorize: bool) -> None:
    torch.manual_seed(0)
    run = conv_run(name)
    model = build_model(run.model)
    params = meta_parameters(run, 0)
    algorithm = get_algorithm(name)
    b = batch()
    update = algorithm.client_step(model, params, b, loss_for("omniglot"), InnerConfig.from_run(run, vectorize=vectorize))
    assert update.tensors.keys() == params.keys()
    assert all(update.tensors[k].shape == params[k].shape for k in params)
    assert all(torch.isfinite(t).all() for t in update.tensors.values())
    assert any(t.abs().sum() > 0 for t in update.tensors.values())
    assert update.weight == TASKS and all(math.isfinite(v) for v in update.metrics.values())
    adapted = algorithm.adapt(model, params, b.x_support[0], b.y_support[0], loss_for("omniglot"), steps=2, lr=0.1)
    if algorithm.head_only:  # ANIL: the body stays where it was
        head = set(head_parameters(model))
        assert all(torch.equal(adapted[k], params[k]) for k in params if k not in head)
        assert any(not torch.equal(adapted[k], params[k]) for k in head)
    metrics = evaluate(algorithm, model, params, b, loss_for("omniglot"), steps=2, lr=0.1, vectorize=vectorize,
                       classification=True)
    assert 0.0 <= metrics["accuracy_pre"] <= 1.0 and 0.0 <= metrics["accuracy_post"] <= 1.0
    assert all(math.isfinite(v) for v in metrics.values())
