"""The update's content, without a server: undone outer steps, the median-norm clip, the metric
schema (checked against what evaluate_holder really reports) and log-safe text."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedmeta.common.aggregation import NormFilter, update_norm
from fedmeta.common.algorithms import ALGORITHMS, OuterConfig, get_algorithm, meta_parameters
from fedmeta.common.algorithms.outer import MAX_UPDATE_ABS, AdamOuter, AverageOuter, ReptileOuter, guarded_step
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import evaluate_holder, validate_holder
from fedmeta.common.metrics import MAX_NAME_CHARS, allowed_metrics, check_metrics, placeholder_metrics, required_metrics
from fedmeta.common.models import ModelSpec, build_model
from fedmeta.common.tasks import make_tasks
from fedmeta.common.textsafe import RateLimit, clip

CONFIG = OuterConfig(lr=1e-3, rounds=100)


def state_copy(outer: object) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in outer.state_dict().items()}  # type: ignore[attr-defined]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- guarded_step: a step that leaves theta or the optimiser state non-finite is undone -----------


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "after-honest-steps"])
def test_adam_step_that_overflows_the_second_moment_is_undone(warm: bool) -> None:
    adam = AdamOuter(CONFIG)
    theta = torch.linspace(-1, 1, 7)
    if warm:
        for r in range(3):
            assert guarded_step(adam, theta, torch.full((7,), 0.1 * (r + 1)), r) == pytest.approx(1e-3)
    theta_before, state_before = theta.clone(), state_copy(adam)
    poison = torch.full((7,), 0.1)
    poison[2] = 1e29  # finite, but g^2 = 1e58 is inf in float32
    assert guarded_step(adam, theta, poison, 3) is None
    assert torch.equal(theta, theta_before) and same_state(state_copy(adam), state_before)
    # unguarded, the same step leaves inf in the state and freezes that coordinate for good
    unguarded = AdamOuter(CONFIG)
    unguarded.step(theta.clone(), poison, 0)
    assert torch.isinf(unguarded.exp_avg_sq).any()
    # and the optimiser still steps afterwards
    assert guarded_step(adam, theta, torch.full((7,), 0.1), 3) is not None
    assert not torch.equal(theta, theta_before) and torch.isfinite(adam.exp_avg_sq).all()


@pytest.mark.parametrize("make", [lambda: ReptileOuter(OuterConfig(lr=1e25, rounds=10)),
                                  lambda: AverageOuter(OuterConfig(lr=1e25, rounds=10))], ids=["reptile", "average"])
def test_parameter_delta_step_to_infinity_is_undone(make) -> None:  # type: ignore[no-untyped-def]
    outer = make()
    theta = torch.ones(5)
    assert guarded_step(outer, theta, torch.full((5,), MAX_UPDATE_ABS), 0) is None
    assert torch.equal(theta, torch.ones(5))
    assert guarded_step(outer, theta, torch.full((5,), 1e-26), 0) is not None and not torch.equal(theta, torch.ones(5))


def test_bounded_values_keep_adam_finite() -> None:
    adam = AdamOuter(CONFIG)
    theta = torch.zeros(4)
    for r in range(3):
        assert guarded_step(adam, theta, torch.full((4,), MAX_UPDATE_ABS), r) is not None
    assert torch.isfinite(adam.exp_avg_sq).all() and torch.isfinite(theta).all()


# ---- the median-norm clip --------------------------------------------------------------------------------


def test_norm_filter_warms_up_then_clips_outliers_to_factor_times_the_median() -> None:
    f = NormFilter(factor=10, window=4, warmup=3)
    assert [f.scale(n) for n in (1e6, 2.0, 3.0)] == [1.0, 1.0, 1.0]  # warm-up: anything goes (but the hard bound)
    assert f.limit() == 10 * 3.0  # median of 1e6, 2, 3
    assert f.scale(25.0) == 1.0
    assert f.limit() == 10 * 14.0  # median of 1e6, 2, 3, 25
    assert f.scale(1e15) == pytest.approx(140.0 / 1e15)
    assert list(f.recent) == [2.0, 3.0, 25.0, pytest.approx(140.0)]  # the clipped norm is recorded; 1e6 left
    for _ in range(10):  # an attacker's clipped updates, a minority, do not drag the median up
        f.scale(1e15)
        f.scale(2.0)
        f.scale(2.5)
    assert f.limit() is not None and f.limit() <= 10 * 2.5  # type: ignore[operator]


def test_norm_filter_off_and_bad_settings() -> None:
    f = NormFilter(factor=0, window=4, warmup=1)
    assert [f.scale(n) for n in (1.0, 1e17)] == [1.0, 1.0] and f.limit() is None
    with pytest.raises(ValueError, match="--norm-clip-factor"):
        NormFilter(factor=0.5, window=4, warmup=1)
    with pytest.raises(ValueError, match="--norm-clip-warmup"):
        NormFilter(factor=10, window=4, warmup=5)


def test_update_norm_does_not_overflow_for_huge_float32_values() -> None:
    t = {"a": torch.full((1000,), 1e18), "b": torch.full((3,), 1e18)}
    assert update_norm(t) == pytest.approx(1e18 * 1003**0.5)


# ---- the metric schema -----------------------------------------------------------------------------------


SMALL = {"eval_tasks_per_client": 3, "eval_queries": 4, "shots": 2, "queries": 3}
SINUSOID = RunConfig(run_id="u", eval_steps=3, model=ModelSpec("mlp", {"in_features": 1, "hidden": [16],
                                                                      "out_features": 1}), **SMALL)
GAUSSIAN = RunConfig(run_id="u", task="gaussian", ways=3, dim=4, inner_lr=0.4, eval_steps=2,
                     model=ModelSpec("mlp", {"in_features": 4, "hidden": [8], "out_features": 3}), **SMALL)


def _run_for(algorithm: str, task: str) -> RunConfig:
    if algorithm in METRIC:  # an encoder, 4 -> 8 -> 8
        model = ModelSpec("mlp", {"in_features": 4, "hidden": [8], "out_features": 8})
        return dataclasses.replace(GAUSSIAN, algorithm=algorithm, model=model)
    return dataclasses.replace(SINUSOID if task == "sinusoid" else GAUSSIAN, algorithm=algorithm)


METRIC = ("protonet", "matchingnet", "relationnet")  # classification only


@pytest.mark.parametrize(("name", "task"), [*((a, "sinusoid") for a in sorted(ALGORITHMS) if a not in METRIC),
                                           ("maml", "gaussian"), *((a, "gaussian") for a in METRIC)])
def test_what_evaluate_holder_reports_fits_the_schema(name: str, task: str) -> None:
    run = _run_for(name, task)
    algorithm = get_algorithm(run.algorithm)
    params = meta_parameters(run, 0)
    metrics = evaluate_holder(algorithm, build_model(run.model), params, make_tasks(run), run, data_seed=0)
    check_metrics(run, metrics, evaluation=True)
    assert required_metrics(run, evaluation=True) <= metrics.keys() <= allowed_metrics(run, evaluation=True)
    assert max(len(k) for k in allowed_metrics(run, evaluation=True)) <= MAX_NAME_CHARS
    validation = validate_holder(algorithm, build_model(run.model), params, make_tasks(run), run, data_seed=0,
                                 rounds_trained=5)
    check_metrics(run, validation, evaluation=True, validation=True)
    assert required_metrics(run, evaluation=True, validation=True) <= validation.keys()


def test_the_schema_names_exactly_what_a_sinusoid_evaluation_can_report() -> None:
    assert allowed_metrics(SINUSOID, evaluation=True) == {
        "loss_pre", "loss_post", "loss_pre_sq", "loss_post_sq", "curve_0", "curve_1", "curve_2", "curve_3",
        "shots_5", "shots_10", "pre_tasks", "curve_tasks"}
    assert allowed_metrics(SINUSOID, evaluation=False) == {"loss_pre", "loss_post", "compute_s"}


@pytest.mark.parametrize("run", [SINUSOID, GAUSSIAN], ids=["sinusoid", "gaussian"])
def test_placeholder_reports_fit_the_schema(run: RunConfig) -> None:
    for evaluation, validation in ((False, False), (True, False), (True, True)):
        report = placeholder_metrics(run, evaluation=evaluation, validation=validation)
        check_metrics(run, report, evaluation=evaluation, validation=validation)


def _eval(**overrides: float) -> dict[str, float]:
    base = {"loss_pre": 2.0, "loss_post": 1.0, "loss_pre_sq": 5.0, "loss_post_sq": 1.5, "curve_0": 2.0,
            "curve_1": 1.5, "curve_2": 1.2, "curve_3": 1.0, "shots_5": 1.0, "shots_10": 0.8}
    return base | overrides


@pytest.mark.parametrize(("metrics", "evaluation", "fragment"), [
    ({"curve_1_x": 1.0}, True, "curve_1_x"),
    ({"curve_" + "9" * 5000: 1.0}, True, "characters"),
    ({"m" * (1 << 20): 1.0}, True, "characters"),
    ({"curve_4": 1.0}, True, "curve_4"),  # past --eval-steps
    ({"shots_7": 1.0}, True, "shots_7"),
    ({"tasks": 1e9}, True, "tasks"),
    ({"curve_tasks": 1e9}, True, "curve_tasks"),  # more than the holder's --eval-tasks-per-client
    ({"pre_tasks": -1.0}, True, "pre_tasks"),
    ({"curve_2": 1.0}, False, "curve_2"),  # an evaluation name in a training update
    ({"loss_post": -1.0}, True, "loss_post"),
    ({"loss_post": float("nan")}, True, "loss_post"),
    ({"loss_post_sq": 0.5}, True, "mean of squares"),  # < loss_post^2
    ({"compute_s": -1.0}, False, "compute_s"),
    ({"compute_s": 1e12}, False, "compute_s"),
])
def test_names_and_values_outside_the_schema_are_refused(metrics: dict[str, float], evaluation: bool,
                                                         fragment: str) -> None:
    full = _eval(**metrics) if evaluation else {"loss_pre": 2.0, "loss_post": 1.0} | metrics
    with pytest.raises(ValueError) as info:
        check_metrics(SINUSOID, full, evaluation=evaluation)
    assert fragment in str(info.value) and len(str(info.value)) < 400, str(info.value)[:400]


def test_an_evaluation_must_report_every_pooled_metric_and_a_curve_without_gaps() -> None:
    check_metrics(SINUSOID, _eval(), evaluation=True)
    check_metrics(SINUSOID, {k: v for k, v in _eval().items() if k not in ("curve_2", "curve_3")}, evaluation=True)
    with pytest.raises(ValueError, match="loss_post_sq"):
        check_metrics(SINUSOID, {k: v for k, v in _eval().items() if k != "loss_post_sq"}, evaluation=True)
    with pytest.raises(ValueError, match="gaps"):
        check_metrics(SINUSOID, {k: v for k, v in _eval().items() if k != "curve_1"}, evaluation=True)
    check_metrics(SINUSOID, {}, evaluation=False)  # training metrics only feed metrics.jsonl
    # The curve is optional (ProtoNets take no steps; --eval-curve-tasks 0), and so are the task counts.
    check_metrics(SINUSOID, {k: v for k, v in _eval().items() if not k.startswith("curve_")}, evaluation=True)
    check_metrics(SINUSOID, _eval(pre_tasks=3.0, curve_tasks=2.0), evaluation=True)  # of its 3 tasks


def test_accuracies_lie_in_the_unit_interval() -> None:
    run = dataclasses.replace(GAUSSIAN, algorithm="maml")
    base = {"loss_pre": 1.0, "loss_post": 0.5, "loss_pre_sq": 1.0, "loss_post_sq": 0.25, "accuracy_pre": 0.3,
            "accuracy_post": 0.6, "accuracy_pre_sq": 0.1, "accuracy_post_sq": 0.4, "curve_0": 0.3, "shots_1": 0.4,
            "shots_5": 0.6}
    check_metrics(run, base, evaluation=True)
    for bad in ({"accuracy_post": 1.5}, {"curve_0": 2.0}, {"accuracy_post_sq": 0.7}, {"shots_1": -0.1}):
        with pytest.raises(ValueError):
            check_metrics(run, base | bad, evaluation=True)


# ---- log-safe text ---------------------------------------------------------------------------------------


def test_clip_bounds_and_escapes_peer_text() -> None:
    assert clip("loss_post") == "loss_post"
    long = clip("x" * (1 << 20))
    assert len(long) < 250 and long.endswith(f"({1 << 20} characters)")
    forged = clip("ok\nWARNING fedmeta.service: forged line\x1b[2J")
    assert "\n" not in forged and "\x1b" not in forged and "\\x0a" in forged
    assert len(clip("\n" * 1000, 50)) < 100


def test_rate_limit_allows_a_burst_per_key_per_window_then_reports_what_it_suppressed() -> None:
    limit = RateLimit(burst=2, window_s=60.0, keys=2)
    assert [limit.allow("a", now=t) for t in (0, 1, 2, 3)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert limit.suppressed("a") == 2
    assert limit.allow("b", now=4) == (True, 0)  # another peer has its own budget
    assert limit.allow("a", now=61) == (True, 2)  # a new window reports the last one's suppressed lines
    limit.allow("c", now=62)
    assert len(limit._windows) == 2  # bounded memory: the oldest key was forgotten
