"""Aggregation math (FlatLayout, WeightedMean), the outer steps, and the centralised reference loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmeta.common import centralized
from fedmeta.common.aggregation import FlatLayout, WeightedMean, weighted_mean
from fedmeta.common.algorithms import ALGORITHMS, InnerConfig, OuterConfig, get_algorithm, meta_parameters
from fedmeta.common.algorithms.outer import AdamOuter, ReptileOuter
from fedmeta.common.config import RunConfig
from fedmeta.common.models import ModelSpec, build_model, init_parameters
from fedmeta.common.evaluation import evaluate
from fedmeta.common.tasks import STREAM_EVAL, STREAM_TRAIN, loss_for, sample_batch, task_seed


def params_like(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"net.0.weight": torch.randn(5, 2, generator=gen), "net.0.bias": torch.randn(5, generator=gen),
            "scale": torch.randn((), generator=gen), "empty": torch.empty(0, 3), "net.2.weight": torch.randn(1, 5, generator=gen)}


# ---- FlatLayout -----------------------------------------------------------------------------------


def test_flatten_then_views_round_trips() -> None:
    params = params_like(0)
    layout = FlatLayout.of(params)
    assert layout.numel == sum(t.numel() for t in params.values()) == 10 + 5 + 1 + 0 + 5
    flat = layout.flatten(params)
    assert flat.shape == (layout.numel,) and flat.dtype == torch.float32 and flat.is_contiguous()
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in params.values()]))
    views = layout.views(flat)
    assert list(views) == list(params)
    for k, t in params.items():
        assert views[k].shape == t.shape and torch.equal(views[k], t), k


def test_flatten_copies_and_views_share_memory() -> None:
    params = params_like(1)
    layout = FlatLayout.of(params)
    flat = layout.flatten(params)
    original = {k: v.clone() for k, v in params.items()}
    flat.add_(1.0)  # the source tensors are untouched by changes to the flat copy
    for k in params:
        assert torch.equal(params[k], original[k]), k
    views = layout.views(flat)
    for k, v in views.items():
        if v.numel():
            assert flat.untyped_storage().data_ptr() == v.untyped_storage().data_ptr(), k
    views["net.0.bias"][2] = 123.0  # writing a view writes the flat vector ...
    a, _ = layout.offsets["net.0.bias"]
    assert flat[a + 2] == 123.0
    flat[layout.offsets["scale"][0]] = -7.0  # ... and the other way round
    assert views["scale"].item() == -7.0


def test_add_is_in_place_and_scaled() -> None:
    params = params_like(2)
    layout = FlatLayout.of(params)
    flat = torch.zeros(layout.numel)
    layout.add_(flat, params, alpha=2.5)
    assert torch.equal(flat, 2.5 * layout.flatten(params))


# ---- WeightedMean -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0], [1.0, 3.0], [0.25, 10.0, 2.0, 7.5]])
def test_weighted_mean_matches_the_reference(weights: list[float]) -> None:
    updates = [params_like(10 + i) for i in range(len(weights))]
    layout = FlatLayout.of(updates[0])
    acc = WeightedMean(layout)
    for u, w in zip(updates, weights):
        acc.add(u, w)
    assert acc.count == len(weights) and acc.weight == pytest.approx(sum(weights))
    expected = weighted_mean(updates, weights)
    got = layout.views(acc.mean())
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)


def test_weighted_mean_by_hand() -> None:
    layout = FlatLayout.of({"w": torch.zeros(2), "s": torch.zeros(())})
    acc = WeightedMean(layout)
    acc.add({"w": torch.tensor([1.0, 2.0]), "s": torch.tensor(4.0)}, 1.0)
    acc.add({"w": torch.tensor([5.0, -2.0]), "s": torch.tensor(0.0)}, 3.0)
    # (1*[1, 2, 4] + 3*[5, -2, 0]) / 4 = [4, -1, 1]
    assert torch.equal(acc.mean(), torch.tensor([4.0, -1.0, 1.0]))
    ref = weighted_mean([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, -2.0])}], [1.0, 3.0])
    assert torch.equal(ref["w"], torch.tensor([4.0, -1.0]))


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_weighted_mean_rejects_bad_weights(weight: float) -> None:
    params = params_like(3)
    acc = WeightedMean(FlatLayout.of(params))
    with pytest.raises(ValueError, match="weight"):
        acc.add(params, weight)
    assert acc.count == 0 and acc.weight == 0.0
    assert torch.equal(acc.total, torch.zeros_like(acc.total))


def test_mean_without_updates_raises() -> None:
    with pytest.raises(ValueError, match="no update"):
        WeightedMean(FlatLayout.of(params_like(4))).mean()


def test_reference_weighted_mean_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([params_like(0)], [1.0, 2.0])


# ---- outer steps --------------------------------------------------------------------------------


def gradients(n: int, size: int = 50, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("lr", [1e-3, 3e-3, 0.1])
def test_adam_outer_equals_torch_adam(lr: float) -> None:
    theta0 = torch.randn(50, generator=torch.Generator().manual_seed(1))
    grads = gradients(6)
    param = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.Adam([param], lr=lr)  # default betas (0.9, 0.999), eps 1e-8
    outer = AdamOuter(OuterConfig(lr=lr, rounds=10))
    theta = theta0.clone()
    for r, g in enumerate(grads):
        param.grad = g.clone()
        opt.step()
        assert outer.step(theta, g, r) == lr
        torch.testing.assert_close(theta, param.detach(), rtol=1e-6, atol=1e-6, msg=f"step {r}")
    assert outer.step_count == len(grads)
    assert not torch.equal(theta, theta0)


def test_adam_outer_state_resume_gives_identical_trajectory() -> None:
    grads = gradients(7, seed=2)
    config = OuterConfig(lr=0.01, rounds=10)
    a = AdamOuter(config)
    theta_a = torch.randn(50, generator=torch.Generator().manual_seed(3))
    for r, g in enumerate(grads[:3]):
        a.step(theta_a, g, r)
    # A checkpoint is a snapshot: state_dict() returns the live buffers, as torch.optim's does.
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert int(state["step"]) == 3 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
    b = AdamOuter(config)
    b.load_state_dict(state)
    theta_b = theta_a.clone()
    for r, g in enumerate(grads[3:], start=3):
        a.step(theta_a, g, r)
        b.step(theta_b, g, r)
        assert torch.equal(theta_a, theta_b), f"step {r}"
    # Without the state the trajectory differs: the test above is not vacuous.
    c = AdamOuter(config)
    theta_c = theta_b.clone()
    c.step(theta_c, grads[0], 7)
    b.step(theta_b, grads[0], 7)
    assert not torch.equal(theta_b, theta_c)


def test_adam_outer_fresh_state_round_trips() -> None:
    a = AdamOuter(OuterConfig(lr=0.01, rounds=10))
    state = a.state_dict()
    assert set(state) == {"step"} and int(state["step"]) == 0
    b = AdamOuter(OuterConfig(lr=0.01, rounds=10))
    b.load_state_dict(state)
    theta_a, theta_b = torch.ones(4), torch.ones(4)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a.step(theta_a, g, 0)
    b.step(theta_b, g, 0)
    assert torch.equal(theta_a, theta_b)
    # The first Adam step moves every coordinate with a non-zero gradient by about lr.
    torch.testing.assert_close(theta_a, torch.tensor([0.99, 1.01, 0.99, 1.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("lr", "rounds", "round_index"), [(1.0, 10, 0), (1.0, 10, 3), (1.0, 10, 9), (0.5, 4, 2), (2.0, 1, 0)])
def test_reptile_outer_is_annealed_step(lr: float, rounds: int, round_index: int) -> None:
    theta = torch.randn(20, generator=torch.Generator().manual_seed(4))
    update = torch.randn(20, generator=torch.Generator().manual_seed(5))
    expected_eps = lr * (1 - round_index / rounds)
    expected = theta + expected_eps * update
    outer = ReptileOuter(OuterConfig(lr=lr, rounds=rounds))
    eps = outer.step(theta, update, round_index)
    assert eps == pytest.approx(expected_eps)
    torch.testing.assert_close(theta, expected, rtol=1e-6, atol=1e-6)
    assert outer.state_dict() == {}


def test_outer_kind_follows_the_algorithm() -> None:
    config = OuterConfig(lr=0.1, rounds=5)
    assert isinstance(get_algorithm("maml").make_outer(config), AdamOuter)
    assert isinstance(get_algorithm("fomaml").make_outer(config), AdamOuter)
    assert isinstance(get_algorithm("reptile").make_outer(config), ReptileOuter)


# ---- the centralised reference ---------------------------------------------------------------


def small_run(algorithm: str) -> RunConfig:
    return RunConfig(run_id="unit", algorithm=algorithm, model=ModelSpec("mlp", {"in_features": 1, "hidden": [16, 16], "out_features": 1}),
                     shots=5, queries=6, tasks_per_client=3, inner_steps=2, inner_lr=0.05, seed=11, rounds=5)


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - {"protonet", "matchingnet", "relationnet"}))  # classification only
def test_centralized_train_equals_manual_loop(name: str) -> None:
    run = small_run(name)
    data_seeds = [3, 17]
    outer_lr = 0.01 if ALGORITHMS[name].default_outer_lr < 1 else 0.5
    rounds_seen: list[tuple[int, float]] = []
    trained = centralized.train(run, outer_lr=outer_lr, data_seeds=data_seeds, rounds=2,
                                on_round=lambda r, m: rounds_seen.append((r, m["meta_loss"])))

    algorithm = get_algorithm(name)
    model = build_model(run.model)
    theta0 = meta_parameters(run, run.seed)
    layout = FlatLayout.of(theta0)
    flat = layout.flatten(theta0)
    outer = algorithm.make_outer(OuterConfig(lr=outer_lr, rounds=run.rounds, cosine=run.cosine_outer))
    losses = []
    for r in range(2):
        inner = InnerConfig.from_run(run, round_index=r)
        acc = WeightedMean(layout)
        post = []
        for data_seed in data_seeds:
            batch = sample_batch("sinusoid", num_tasks=3, shots=5, queries=6, seed=task_seed(11, data_seed, STREAM_TRAIN, r))
            update = algorithm.client_step(model, layout.views(flat.clone()), batch, loss_for("sinusoid"), inner)
            acc.add(update.tensors, update.weight)
            post.append(update.metrics["loss_post"])
        outer.step(flat, acc.mean(), r)
        losses.append(sum(post) / len(post))
    expected = layout.views(flat)

    assert list(trained) == list(theta0)
    for k in expected:
        torch.testing.assert_close(trained[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.equal(trained[k], theta0[k]) for k in theta0)
    assert [r for r, _ in rounds_seen] == [0, 1]
    assert [m for _, m in rounds_seen] == pytest.approx(losses, rel=1e-6)
    assert all(math.isfinite(m) for _, m in rounds_seen)


def test_centralized_train_leaves_a_given_theta_untouched() -> None:
    run = small_run("fomaml")
    theta = init_parameters(run.model, 5)
    before = {k: v.clone() for k, v in theta.items()}
    trained = centralized.train(run, outer_lr=0.01, data_seeds=[1], rounds=1, theta=theta)
    for k in theta:
        assert torch.equal(theta[k], before[k]), k
    assert any(not torch.equal(trained[k], before[k]) for k in theta)


def test_evaluate_held_out_averages_each_clients_held_out_tasks() -> None:
    run = dataclasses.replace(small_run("maml"), eval_tasks_per_client=3, eval_shots=4, eval_queries=8, eval_steps=2)
    params = init_parameters(run.model, 1)
    data_seeds = [2, 9]
    got = centralized.evaluate_held_out(run, params, data_seeds=data_seeds)
    model = build_model(run.model)
    expected: dict[str, float] = {}
    for data_seed in data_seeds:
        batch = sample_batch("sinusoid", num_tasks=3, shots=4, queries=8, seed=task_seed(11, data_seed, STREAM_EVAL, 0))
        m = evaluate(get_algorithm("maml"), model, params, batch, loss_for("sinusoid"), steps=2, lr=run.inner_lr)
        for k in m:
            expected[k] = expected.get(k, 0.0) + m[k] / len(data_seeds)
    assert set(got) == {"loss_pre", "loss_post", "loss_pre_sq", "loss_post_sq", "curve_0", "curve_1", "curve_2",
                        "shots_4", "shots_8", "pre_tasks", "curve_tasks"}  # onboarding: regression also adapts on twice the shots
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert got["shots_4"] == got["loss_post"]
    assert got["loss_post"] != got["loss_pre"]  # adaptation ran (from a random init it may overfit 4 shots)
