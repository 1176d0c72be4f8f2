"""One contract suite over every registered algorithm, and plain-autograd references for each.

The references below share no code with common/algorithms: an nn.Module copy of the MLP,
explicit Python loops over tasks and inner steps, and torch.autograd.grad.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.common.algorithms import ALGORITHMS, Algorithm, InnerConfig, UpdateKind, get_algorithm
from fedmeta.common.evaluation import evaluate
from fedmeta.common.models import ModelSpec, build_model, init_parameters
from fedmeta.common.tasks import TaskBatch, loss_for, sample_batch

SPEC = ModelSpec("mlp", {"in_features": 1, "hidden": [16, 16], "out_features": 1})
NAMES = ["fomaml", "maml", "reptile"]  # the core three; test_algorithm_contract.py covers every algorithm
LOSS = loss_for("sinusoid")
Params = dict[str, torch.Tensor]


def setup(*, dtype: torch.dtype = torch.float32, seed: int = 0, tasks: int = 4, shots: int = 5,
          queries: int = 7) -> tuple[nn.Module, Params, TaskBatch]:
    model = build_model(SPEC)
    params = {k: v.to(dtype) for k, v in init_parameters(SPEC, seed).items()}
    batch = sample_batch("sinusoid", num_tasks=tasks, shots=shots, queries=queries, seed=seed + 100)
    batch = TaskBatch(*(t.to(dtype) for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    return model, params, batch


# ---- the plain-autograd reference ------------------------------------------------------------


class ReferenceMLP:
    """An nn.Module copy of the model, evaluated layer by layer with explicit weight tensors."""

    def __init__(self, params: Params) -> None:
        dtype = next(iter(params.values())).dtype
        self.module = copy.deepcopy(build_model(SPEC)).to(dtype)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(params[name])
        self.names = [name for name, _ in self.module.named_parameters()]

    def theta(self) -> list[torch.Tensor]:
        """Fresh leaves holding theta, for one task's graph."""
        return [p.detach().clone().requires_grad_(True) for p in self.module.parameters()]

    def forward(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        it = iter(weights)
        h = x
        for layer in self.module.net:
            h = F.linear(h, next(it), next(it)) if isinstance(layer, nn.Linear) else layer(h)
        return h

    def loss(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.forward(weights, x) - y) ** 2).mean()

    def sgd(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
            create_graph: bool) -> list[torch.Tensor]:
        for _ in range(steps):
            grads = torch.autograd.grad(self.loss(weights, x, y), weights, create_graph=create_graph)
            weights = [w - lr * g for w, g in zip(weights, grads)]
            if not create_graph:
                weights = [w.detach().requires_grad_(True) for w in weights]
        return weights

    def as_dict(self, tensors: list[torch.Tensor]) -> Params:
        return dict(zip(self.names, tensors))


Reference = Callable[[Params, TaskBatch, int, float], tuple[Params, float, float]]


def _average(per_task: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(ts).mean(0) for ts in zip(*per_task)]


def reference_maml(params: Params, batch: TaskBatch, steps: int, lr: float) -> tuple[Params, float, float]:
    """mean_t grad_theta L_q,t(SGD^k(theta; support_t)), differentiating through the inner loop."""
    ref = ReferenceMLP(params)
    grads, pre, post = [], [], []
    for t in range(batch.num_tasks):
        theta = ref.theta()
        adapted = ref.sgd(theta, batch.x_support[t], batch.y_support[t], steps=steps, lr=lr, create_graph=True)
        loss = ref.loss(adapted, batch.x_query[t], batch.y_query[t])
        grads.append([g.detach() for g in torch.autograd.grad(loss, theta)])
        pre.append(float(ref.loss(theta, batch.x_query[t], batch.y_query[t]).detach()))
        post.append(float(loss.detach()))
    return ref.as_dict(_average(grads)), sum(pre) / len(pre), sum(post) / len(post)


def reference_fomaml(params: Params, batch: TaskBatch, steps: int, lr: float) -> tuple[Params, float, float]:
    """mean_t grad_{theta'} L_q,t(theta'), the inner gradients detached."""
    ref = ReferenceMLP(params)
    grads, pre, post = [], [], []
    for t in range(batch.num_tasks):
        theta = ref.theta()
        adapted = ref.sgd(theta, batch.x_support[t], batch.y_support[t], steps=steps, lr=lr, create_graph=False)
        adapted = [a.detach().requires_grad_(True) for a in adapted]
        loss = ref.loss(adapted, batch.x_query[t], batch.y_query[t])
        grads.append(list(torch.autograd.grad(loss, adapted)))
        pre.append(float(ref.loss(theta, batch.x_query[t], batch.y_query[t]).detach()))
        post.append(float(loss.detach()))
    return ref.as_dict(_average(grads)), sum(pre) / len(pre), sum(post) / len(post)


def reference_reptile(params: Params, batch: TaskBatch, steps: int, lr: float) -> tuple[Params, float, float]:
    """mean_t (SGD^k(theta; support_t ++ query_t) - theta)."""
    ref = ReferenceMLP(params)
    deltas, pre, post = [], [], []
    for t in range(batch.num_tasks):
        theta = ref.theta()
        x = torch.cat([batch.x_support[t], batch.x_query[t]])
        y = torch.cat([batch.y_support[t], batch.y_query[t]])
        adapted = ref.sgd(theta, x, y, steps=steps, lr=lr, create_graph=False)
        deltas.append([(a - p).detach() for a, p in zip(adapted, theta)])
        pre.append(float(ref.loss(theta, batch.x_query[t], batch.y_query[t]).detach()))
        post.append(float(ref.loss(adapted, batch.x_query[t], batch.y_query[t]).detach()))
    return ref.as_dict(_average(deltas)), sum(pre) / len(pre), sum(post) / len(post)


REFERENCES: dict[str, Reference] = {"maml": reference_maml, "fomaml": reference_fomaml, "reptile": reference_reptile}
EXPECTED_KIND = {"maml": UpdateKind.META_GRADIENT, "fomaml": UpdateKind.META_GRADIENT,
                 "reptile": UpdateKind.PARAMETER_DELTA}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_model_is_the_zoo_model(dtype: torch.dtype) -> None:
    model, params, batch = setup(dtype=dtype, seed=3)
    ref = ReferenceMLP(params)
    x = batch.x_query[0]
    out = ref.forward(ref.theta(), x)
    assert out.shape == (7, 1) and out.dtype == dtype
    torch.testing.assert_close(out, ref.module(x), rtol=0, atol=0)
    torch.testing.assert_close(out, torch.func.functional_call(model, params, (x,)), rtol=0, atol=0)


# ---- the contract, over the registry -----------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    assert set(EXPECTED_KIND) <= set(ALGORITHMS)
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name
        assert get_algorithm(name) is algorithm
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        get_algorithm("sgd")


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_update_kind(name: str) -> None:
    assert ALGORITHMS[name].update_kind is EXPECTED_KIND[name]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("name", NAMES)
def test_client_step_contract(name: str, vectorize: bool) -> None:
    algorithm = ALGORITHMS[name]
    assert isinstance(algorithm.update_kind, UpdateKind)
    assert algorithm.default_outer_lr > 0
    model, params, batch = setup(tasks=3)
    before = {k: v.clone() for k, v in params.items()}
    update = algorithm.client_step(model, params, batch, LOSS, InnerConfig(steps=2, lr=0.05, vectorize=vectorize))
    assert list(update.tensors) == list(params)
    for k, t in update.tensors.items():
        assert t.shape == params[k].shape and t.dtype == torch.float32, k
        assert not t.requires_grad, k
        assert bool(torch.isfinite(t).all()), k
    assert sum(float(t.abs().sum()) for t in update.tensors.values()) > 0
    assert update.weight == 3.0 == batch.num_tasks
    assert {"loss_pre", "loss_post"} <= set(update.metrics)
    for key in ("loss_pre", "loss_post"):
        assert isinstance(update.metrics[key], float) and torch.isfinite(torch.tensor(update.metrics[key])), key
    for k in params:
        assert torch.equal(params[k], before[k]), f"client_step modified the parameter {k}"


@pytest.mark.parametrize("name", NAMES)
def test_client_step_is_deterministic(name: str) -> None:
    algorithm = ALGORITHMS[name]
    inner = InnerConfig(steps=2, lr=0.05)
    model, params, batch = setup(seed=1)
    first = algorithm.client_step(model, params, batch, LOSS, inner)
    model2, params2, batch2 = setup(seed=1)  # everything rebuilt from the same seeds
    second = algorithm.client_step(model2, params2, batch2, LOSS, inner)
    for k in first.tensors:
        assert torch.equal(first.tensors[k], second.tensors[k]), k
    assert first.metrics == second.metrics and first.weight == second.weight
    _, _, other_batch = setup(seed=2)
    other = algorithm.client_step(model, params, other_batch, LOSS, inner)
    assert any(not torch.equal(first.tensors[k], other.tensors[k]) for k in first.tensors)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_vmap_and_loop_agree(name: str, steps: int) -> None:
    algorithm = ALGORITHMS[name]
    model, params, batch = setup(seed=4, tasks=5)
    vmapped = algorithm.client_step(model, params, batch, LOSS, InnerConfig(steps=steps, lr=0.05, vectorize=True))
    looped = algorithm.client_step(model, params, batch, LOSS, InnerConfig(steps=steps, lr=0.05, vectorize=False))
    for k in params:
        torch.testing.assert_close(vmapped.tensors[k], looped.tensors[k], rtol=1e-5, atol=1e-5, msg=k)
    for key in ("loss_pre", "loss_post"):
        assert vmapped.metrics[key] == pytest.approx(looped.metrics[key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_client_step_rejects_parameters_of_the_wrong_shape(name: str) -> None:
    model, params, batch = setup()
    params["net.0.weight"] = torch.zeros(3, 1)  # the model has 16 units there
    with pytest.raises(RuntimeError):
        ALGORITHMS[name].client_step(model, params, batch, LOSS, InnerConfig(steps=1, lr=0.01))


# ---- agreement with the references --------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_client_step_matches_plain_autograd_reference(name: str, steps: int, vectorize: bool) -> None:
    assert name in REFERENCES, f"add a plain-autograd reference for {name!r} to REFERENCES in this file"
    model, params, batch = setup(dtype=torch.float64, seed=5, tasks=3)
    lr = 0.1
    update = ALGORITHMS[name].client_step(model, params, batch, LOSS, InnerConfig(steps=steps, lr=lr, vectorize=vectorize))
    expected, pre, post = REFERENCES[name](params, batch, steps, lr)
    assert list(update.tensors) == list(expected)
    for k in expected:
        torch.testing.assert_close(update.tensors[k], expected[k], rtol=1e-9, atol=1e-11, msg=k)
    assert update.metrics["loss_pre"] == pytest.approx(pre, rel=1e-9)
    assert update.metrics["loss_post"] == pytest.approx(post, rel=1e-9)
    if steps:
        assert post < pre  # a few small steps on a sinusoid lower the query loss
    else:
        assert post == pytest.approx(pre, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_client_step_matches_reference_in_float32(name: str) -> None:
    model, params, batch = setup(seed=6, tasks=4)
    update = ALGORITHMS[name].client_step(model, params, batch, LOSS, InnerConfig(steps=3, lr=0.05))
    expected, _, _ = REFERENCES[name](params, batch, 3, 0.05)
    for k in expected:
        torch.testing.assert_close(update.tensors[k], expected[k], rtol=1e-5, atol=1e-5, msg=k)


# ---- MAML's second-order term ---------------------------------------------------------------------


def flat_loss(ref: ReferenceMLP, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weights, offset = [], 0
    for p in ref.module.parameters():
        weights.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return ref.loss(weights, x, y)


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()])


def meta_objective(ref: ReferenceMLP, flat: torch.Tensor, batch: TaskBatch, lr: float) -> torch.Tensor:
    """F(theta) = mean_t L_q,t(theta - lr * grad L_s,t(theta)): what one-step MAML differentiates."""
    total = flat.new_zeros(())
    for t in range(batch.num_tasks):
        theta = flat.detach().requires_grad_(True)
        g = torch.autograd.grad(flat_loss(ref, theta, batch.x_support[t], batch.y_support[t]), theta)[0]
        total = total + flat_loss(ref, flat - lr * g, batch.x_query[t], batch.y_query[t])
    return total / batch.num_tasks


def test_maml_minus_fomaml_is_the_hessian_term() -> None:
    """For one inner step: grad_theta L_q(theta') = (I - a H_s(theta)) grad L_q(theta'), theta' = theta - a g_s."""
    model, params, batch = setup(dtype=torch.float64, seed=7, tasks=3)
    lr = 0.1
    inner = InnerConfig(steps=1, lr=lr)
    maml = flatten(ALGORITHMS["maml"].client_step(model, params, batch, LOSS, inner).tensors)
    fomaml = flatten(ALGORITHMS["fomaml"].client_step(model, params, batch, LOSS, inner).tensors)
    ref = ReferenceMLP(params)
    theta = flatten(params)
    expected_maml, expected_fomaml, hessian_term = [torch.zeros_like(theta) for _ in range(3)]
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t]
        leaf = theta.clone().requires_grad_(True)
        g_s = torch.autograd.grad(flat_loss(ref, leaf, xs, ys), leaf)[0]
        adapted = (theta - lr * g_s).requires_grad_(True)
        v = torch.autograd.grad(flat_loss(ref, adapted, xq, yq), adapted)[0]  # grad L_q(theta')
        _, hv = torch.autograd.functional.hvp(lambda f: flat_loss(ref, f, xs, ys), theta, v)  # H_s(theta) v
        expected_fomaml += v / batch.num_tasks
        expected_maml += (v - lr * hv) / batch.num_tasks
        hessian_term += lr * hv / batch.num_tasks
    torch.testing.assert_close(fomaml, expected_fomaml, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(maml, expected_maml, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fomaml - maml, hessian_term, rtol=1e-7, atol=1e-12)
    # The second-order term is not negligible here, so the checks above tell the two apart.
    assert float((maml - fomaml).norm()) > 1e-2 * float(maml.norm())


@pytest.mark.parametrize("direction_seed", [0, 1, 2])
def test_maml_gradient_matches_finite_differences(direction_seed: int) -> None:
    model, params, batch = setup(dtype=torch.float64, seed=8, tasks=3)
    lr = 0.1
    inner = InnerConfig(steps=1, lr=lr)
    maml = flatten(ALGORITHMS["maml"].client_step(model, params, batch, LOSS, inner).tensors)
    fomaml = flatten(ALGORITHMS["fomaml"].client_step(model, params, batch, LOSS, inner).tensors)
    ref = ReferenceMLP(params)
    theta = flatten(params)
    d = torch.randn(theta.shape, generator=torch.Generator().manual_seed(direction_seed), dtype=torch.float64)
    d /= d.norm()
    h = 1e-6
    with torch.enable_grad():
        fd = (float(meta_objective(ref, theta + h * d, batch, lr)) - float(meta_objective(ref, theta - h * d, batch, lr))) / (2 * h)
    assert float(maml @ d) == pytest.approx(fd, rel=1e-4, abs=1e-8)
    # First-order MAML drops the Hessian term and misses the directional derivative.
    assert abs(float(fomaml @ d) - fd) > 10 * abs(float(maml @ d) - fd)


# ---- adapt and evaluate -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_adapt_is_k_steps_of_sgd(name: str, steps: int) -> None:
    model, params, batch = setup(dtype=torch.float64, seed=9)
    x, y = batch.x_support[0], batch.y_support[0]
    adapted = ALGORITHMS[name].adapt(model, params, x, y, LOSS, steps=steps, lr=0.1)
    ref = ReferenceMLP(params)
    expected = ref.as_dict(ref.sgd(ref.theta(), x, y, steps=steps, lr=0.1, create_graph=False))
    assert list(adapted) == list(params)
    for k in params:
        torch.testing.assert_close(adapted[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
    if steps:
        assert float(ref.loss(list(adapted.values()), x, y)) < float(ref.loss(ref.theta(), x, y).detach())


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("name", NAMES)
def test_evaluate_measures_query_loss_before_and_after_adapt(name: str, vectorize: bool) -> None:
    algorithm: Algorithm = ALGORITHMS[name]
    model, params, batch = setup(dtype=torch.float64, seed=10, tasks=3, queries=20)
    metrics = evaluate(algorithm, model, params, batch, LOSS, steps=4, lr=0.05, vectorize=vectorize)
    ref = ReferenceMLP(params)
    pre, post = [], []
    curve = [[] for _ in range(5)]
    for t in range(batch.num_tasks):
        with torch.no_grad():  # the nn.Module itself, holding theta
            pre.append(float(F.mse_loss(ref.module(batch.x_query[t]), batch.y_query[t])))
        for k in range(5):
            adapted = ref.sgd(ref.theta(), batch.x_support[t], batch.y_support[t], steps=k, lr=0.05, create_graph=False)
            curve[k].append(float(ref.loss(adapted, batch.x_query[t], batch.y_query[t]).detach()))
        post.append(curve[4][-1])
    assert set(metrics) == {"loss_pre", "loss_post", "loss_pre_sq", "loss_post_sq", *(f"curve_{k}" for k in range(5)),
                            "pre_tasks", "curve_tasks"}
    assert metrics["pre_tasks"] == metrics["curve_tasks"] == batch.num_tasks  # curve_tasks None: every task
    assert metrics["loss_pre"] == pytest.approx(sum(pre) / len(pre), rel=1e-9)
    assert metrics["loss_post"] == pytest.approx(sum(post) / len(post), rel=1e-9)
    assert metrics["loss_post_sq"] == pytest.approx(sum(v * v for v in post) / len(post), rel=1e-9)
    for k in range(5):
        assert metrics[f"curve_{k}"] == pytest.approx(sum(curve[k]) / len(curve[k]), rel=1e-9)
    assert metrics["loss_post"] < metrics["loss_pre"]


# ---- the inputs: models and task batches ---------------------------------------------------------


def test_init_parameters_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init_parameters(SPEC, 7)
    assert torch.equal(torch.rand(3), expected_next)
    b = init_parameters(SPEC, 7)
    c = init_parameters(SPEC, 8)
    assert list(a) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]
    assert [tuple(t.shape) for t in a.values()] == [(16, 1), (16,), (16, 16), (16,), (1, 16), (1,)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    assert not any(t.requires_grad for t in a.values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("resnet"), "unknown model 'resnet'"),
        (ModelSpec("mlp", {"width": 3}), r"unknown arguments \['width'\]"),
        (ModelSpec("no_such_module:Net"), "cannot import"),
        (ModelSpec("torch.nn:NoSuchLayer"), "cannot import"),
        (ModelSpec("torch.nn:functional"), "expected a torch.nn.Module subclass"),
        (ModelSpec("torch.nn:Linear", {"in_features": 2, "out_features": 3}), "allows none by that name"),
    ],
)
def test_build_model_errors(spec: ModelSpec, message: str) -> None:
    allowed = {"no_such_module:Net", "torch.nn:NoSuchLayer", "torch.nn:functional"}
    with pytest.raises(ValueError, match=message):
        build_model(spec, allowed_imports=allowed)


def test_build_model_by_import_path_and_spec_json() -> None:
    model = build_model(ModelSpec("torch.nn:Linear", {"in_features": 2, "out_features": 3}),
                        allowed_imports={"torch.nn:Linear"})
    assert isinstance(model, nn.Linear) and model.weight.shape == (3, 2)
    assert ModelSpec.from_json(SPEC.to_json()) == SPEC


def test_sample_batch_is_seeded_with_the_documented_ranges() -> None:
    a = sample_batch("sinusoid", num_tasks=6, shots=4, queries=9, seed=31)
    b = sample_batch("sinusoid", num_tasks=6, shots=4, queries=9, seed=31)
    c = sample_batch("sinusoid", num_tasks=6, shots=4, queries=9, seed=32)
    fields = ("x_support", "y_support", "x_query", "y_query")
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    assert not torch.equal(a.x_support, c.x_support)
    assert a.num_tasks == 6
    assert a.x_support.shape == a.y_support.shape == (6, 4, 1)
    assert a.x_query.shape == a.y_query.shape == (6, 9, 1)
    x = torch.cat([a.x_support, a.x_query], 1)
    y = torch.cat([a.y_support, a.y_query], 1)
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    assert float(y.abs().max()) <= 5.0
    with pytest.raises(ValueError, match="unknown task 'omniglot'"):
        sample_batch("omniglot", num_tasks=1, shots=1, queries=1, seed=0)
