"""Robust aggregators: coordinate median, trimmed mean, clipped mean."""

from __future__ import annotations

import math

import pytest
import torch

from fedmeta.common.aggregation import (
    BufferedAggregator,
    ClippedMean,
    FlatLayout,
    WeightedMean,
    coordinate_median,
    make_aggregator,
    trimmed_mean,
    update_norm,
)

LAYOUT = FlatLayout.of({"w": torch.zeros(2, 2), "b": torch.zeros(3)})


def _update(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), value), "b": torch.full((3,), value)}


def test_median_and_trimmed_mean_ignore_one_outlier() -> None:
    values = [1.0, 2.0, 3.0, 4.0, -1000.0]
    stacked = torch.tensor([[v, -v] for v in values])
    torch.testing.assert_close(coordinate_median(stacked), torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(coordinate_median(stacked[:4]), torch.tensor([2.5, -2.5]))
    torch.testing.assert_close(trimmed_mean(stacked, 0.2), torch.tensor([2.0, -2.0]))  # drops -1000 and 4
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_mean(stacked[:2], 0.49 + 0.01)


@pytest.mark.parametrize("kind", ["median", "trimmed-mean"])
def test_buffered_aggregator_resists_a_scaled_sign_flipped_update(kind: str) -> None:
    honest = [0.9, 1.0, 1.1, 1.0]
    agg = make_aggregator(kind, LAYOUT)
    assert isinstance(agg, BufferedAggregator)
    for v in honest:
        agg.add(_update(v), 1.0)
    agg.add(_update(-1000.0), 1.0)
    out = agg.take_mean()
    assert out.shape == (LAYOUT.numel,)
    assert torch.all((out > 0.85) & (out < 1.15))
    mean = WeightedMean(LAYOUT)
    for v in [*honest, -1000.0]:
        mean.add(_update(v), 1.0)
    assert torch.all(mean.take_mean() < -150)  # the plain mean follows the attacker


def test_clipped_mean_bounds_each_update() -> None:
    agg = ClippedMean(LAYOUT, max_norm=1.0)
    big = _update(100.0)
    agg.add(big, 1.0)
    assert update_norm({"x": agg.total}) == pytest.approx(1.0, rel=1e-5)
    agg.add(_update(0.01), 1.0)  # under the bound: unchanged
    expected = (torch.full((7,), 100.0) / update_norm(big) + 0.01) / 2
    torch.testing.assert_close(agg.take_mean(), expected)


def test_make_aggregator_validates() -> None:
    with pytest.raises(ValueError, match="max-update-norm"):
        make_aggregator("clipped-mean", LAYOUT)
    with pytest.raises(ValueError, match="median or trimmed-mean"):
        BufferedAggregator(LAYOUT, "mode")
    with pytest.raises(ValueError, match="weight"):
        make_aggregator("median", LAYOUT).add(_update(1.0), 0.0)
    with pytest.raises(ValueError, match="no update"):
        make_aggregator("median", LAYOUT).take_mean()


def test_update_norm_in_blocks_equals_the_float64_norm_and_does_not_overflow():
    """update_norm accumulates float64 a block at a time (no float64 copy of the update): the same
    value as one float64 norm, for a one-vector update (decode()'s flat), tensor by tensor, and for
    values whose float32 squares would overflow."""
    from fedmeta.common.aggregation import NORM_BLOCK
    from fedmeta.common.codec import decode, encode

    g = torch.Generator().manual_seed(0)
    for n in (1, NORM_BLOCK, 3 * NORM_BLOCK + 17):
        t = {"a": torch.randn(n, generator=g), "b": torch.randn(5, 3, generator=g)}
        expected = float(torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in t.values()]).double()))
        assert update_norm(t) == pytest.approx(expected, rel=1e-12)
        flat = decode(encode(t))
        assert flat.flat is not None and update_norm(flat) == pytest.approx(expected, rel=1e-12)
    huge = {"x": torch.full((2 * NORM_BLOCK + 1,), 1e30)}
    assert update_norm(huge) == pytest.approx(1e30 * math.sqrt(2 * NORM_BLOCK + 1), rel=1e-6)
