"""Inductive inference: a query's prediction never depends on the other queries of its batch.

For every classification algorithm (and the variants of Matching and Relation Nets' rules) and
every inductive Conv4 norm, a query predicted alone gives the same probabilities (to 1e-5) as in
a batch of 75, after adaptation on a support set; the transductive norm ("batch") is the control
that shows the test can fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedmeta.common.algorithms import ALGORITHMS, configured, get_algorithm, meta_parameters
from fedmeta.common.config import RunConfig
from fedmeta.common.evaluation import predict
from fedmeta.common.models import NORMS, ModelSpec, build_model, takes_context, uses_batch_statistics

WAYS, SHOTS, QUERIES = 5, 1, 75
INDUCTIVE = tuple(n for n in NORMS if n != "batch")


def _setup(algorithm: str, norm: str, **settings: Any):  # type: ignore[no-untyped-def]
    spec = ModelSpec("conv4", {"in_channels": 1, "ways": WAYS, "hidden": 8, "image_size": 16, "norm": norm})
    run = RunConfig(run_id="unit", algorithm=algorithm, task="omniglot", model=spec, ways=WAYS, inner_steps=2,
                    inner_lr=0.4, **settings)
    params = meta_parameters(run, seed=0)
    gen = torch.Generator().manual_seed(1)
    xs = torch.rand(WAYS * SHOTS, 1, 16, 16, generator=gen)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS)
    xq = xs[torch.arange(QUERIES) % WAYS] + 0.3 * torch.rand(QUERIES, 1, 16, 16, generator=gen)  # noisy copies
    model = build_model(spec)
    algo = configured(get_algorithm(algorithm), run)  # the run's settings of its prediction rule
    adapted = algo.adapt(model, params, xs, ys, F.cross_entropy, steps=2, lr=0.4)
    return algo, model, adapted, xs, ys, xq


def _alone_and_batched(algorithm: str, norm: str, **settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the 75 queries, each predicted alone, and predicted in one batch."""
    algo, model, adapted, xs, ys, xq = _setup(algorithm, norm, **settings)
    with torch.no_grad():
        batched = predict(algo, model, adapted, xs, ys, xq)
        alone = torch.cat([predict(algo, model, adapted, xs, ys, xq[i:i + 1]) for i in range(QUERIES)])
    return alone, batched


# Variants whose prediction rule differs from the algorithm's default: the full-context embeddings
# (an LSTM over the support set, an attention LSTM per query), relation scores under cross-entropy.
VARIANTS = [(a, {}) for a in sorted(ALGORITHMS)] + [
    ("matchingnet", {"matching_fce": True, "matching_steps": 3}),
    ("relationnet", {"relation_loss": "ce", "relation_pool": "mean"}),
]


@pytest.mark.parametrize("norm", INDUCTIVE)
@pytest.mark.parametrize(("algorithm", "settings"), VARIANTS,
                         ids=[a + "".join(f"-{v}" for v in s.values()) for a, s in VARIANTS])
def test_a_query_alone_is_predicted_as_in_a_batch(algorithm: str, settings: dict[str, Any], norm: str) -> None:
    alone, batched = _alone_and_batched(algorithm, norm, **settings)
    assert alone.shape == batched.shape == (QUERIES, batched.shape[-1])
    torch.testing.assert_close(alone.softmax(-1), batched.softmax(-1), atol=1e-5, rtol=0)
    assert torch.equal(alone.argmax(-1), batched.argmax(-1))
    assert float((batched - batched.mean(0)).abs().max()) > 1e-3  # the queries' outputs differ: not constant


def test_transductive_batch_norm_is_the_control() -> None:
    """With norm="batch" a lone query is normalised with its own statistics: other probabilities."""
    alone, batched = _alone_and_batched("maml", "batch")
    assert float((alone.softmax(-1) - batched.softmax(-1)).abs().max()) > 1e-2


def test_norms_report_what_they_do() -> None:
    def conv(norm: str):  # type: ignore[no-untyped-def]
        return build_model(ModelSpec("conv4", {"hidden": 8, "image_size": 16, "norm": norm}))

    assert [uses_batch_statistics(conv(n)) for n in NORMS] == [n == "batch" for n in NORMS]
    assert [takes_context(conv(n)) for n in NORMS] == [n == "support" for n in NORMS]
    names = {n: [(k, tuple(v.shape)) for k, v in conv(n).named_parameters()] for n in NORMS}
    assert all(names[n] == names["batch"] for n in NORMS)  # checkpoints and ANIL's head names do not move
    assert ("head.weight", (5, 8)) in names["support"]
    with pytest.raises(ValueError, match="norm: expected one of support, group, layer, batch"):
        conv("instance")


def test_support_norm_uses_only_the_support_statistics() -> None:
    """norm="support" normalises queries with the support set's mean and variance, per channel."""
    algo, model, adapted, xs, ys, xq = _setup("maml", "support")
    norm = model.features[1]
    h = torch.randn(7, 8, 4, 4)
    out = norm(h, 3)
    ref = h[:3]
    mean, var = ref.mean((0, 2, 3), keepdim=True), ref.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (h - mean) / torch.sqrt(var + 1e-5))
    # Without a context (the support set's own pass) it is batch norm.
    torch.testing.assert_close(norm(ref), F.batch_norm(ref, None, None, training=True))
