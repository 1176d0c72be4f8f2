"""summary.json's evaluation report: pooled confidence intervals and onboarding numbers."""

from __future__ import annotations

import math

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import ci95, summarize
from fedmeta.server.report import eval_summary, steps_to_fraction


@pytest.mark.parametrize(("curve", "higher", "expected"), [
    ([0.2, 0.5, 0.65, 0.7], True, 2),      # gain 0.5; 90% of it (0.45) first reached at step 2
    ([3.0, 1.0, 0.8, 0.7], False, 2),      # loss: gain 2.3; 2.07 first reached at step 2
    ([0.2, 0.2], True, None),              # no gain: no answer
    ([0.5], True, None),
])
def test_steps_to_fraction(curve: list[float], higher: bool, expected: int | None) -> None:
    assert steps_to_fraction(curve, 0.9, higher_is_better=higher) == expected


def test_ci95_from_pooled_means_and_squares() -> None:
    values = [0.2, 0.4, 0.6, 0.8, 1.0]
    mean = sum(values) / 5
    mean_sq = sum(v * v for v in values) / 5
    sample_sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert ci95(mean, mean_sq, 5) == pytest.approx(1.959963984540054 * sample_sd / math.sqrt(5))
    assert math.isnan(ci95(0.5, 0.25, 1))


def test_eval_summary_pools_clients_and_reports_each() -> None:
    run = RunConfig(run_id="r", task="gaussian", eval_steps=2)
    a = {"accuracy_pre": 0.2, "accuracy_post": 0.6, "accuracy_pre_sq": 0.05, "accuracy_post_sq": 0.4,
         "loss_pre": 1.6, "loss_post": 1.0, "curve_0": 0.2, "curve_1": 0.5, "curve_2": 0.6, "shots_1": 0.4, "shots_5": 0.6}
    pooled = summarize(a, 100, classification=True)
    assert pooled["curve"] == [0.2, 0.5, 0.6] and pooled["by_shots"] == {"1": 0.4, "5": 0.6}
    out = eval_summary(run, a, 100.0, {"x": {"tasks": 100.0, **a}})
    assert out["tasks"] == 100 and out["ways"] == 5 and out["transductive_bn"] is False
    assert out["per_client"]["x"]["steps_to_90pct"] == 2 and out["per_client"]["x"]["tasks"] == 100
    assert out["ci95"] == pytest.approx(ci95(0.6, 0.4, 100))
