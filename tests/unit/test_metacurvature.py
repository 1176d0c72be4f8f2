"""Meta-Curvature on a conv + linear model against a plain-autograd reference with explicit Kronecker products.

The reference shares nothing with common/algorithms: F.conv2d and a matrix product written out,
torch.autograd.grad (create_graph=True for second order), and the preconditioner as one full
matrix per tensor, vec(G') = (M_out kron M_in kron M_filter) vec(G) for the conv weight
(out, in, k, k), (M_out kron M_in) vec(G) for the linear weight, M_b g for a bias. With
identity matrices Meta-Curvature is MAML: the same meta-gradient for theta, bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.common.algorithms import ALGORITHMS, InnerConfig
from fedmeta.common.algorithms import metacurvature as mc
from fedmeta.common.tasks import TaskBatch

Params = dict[str, torch.Tensor]
TASKS, SUPPORT, QUERY, CLASSES, STEPS, LR = 2, 6, 5, 4, 2, 0.3


class ConvLinear(nn.Module):
    """conv 2->3 channels, 3x3, on 5x5 inputs; ReLU; a linear layer 27 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(27, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def ref_forward(w: Params, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(F.conv2d(x, w["conv.weight"], w["conv.bias"])).flatten(1)
    return h @ w["fc.weight"].T + w["fc.bias"]


def full_matrix(w: Params, name: str) -> torch.Tensor:
    """The whole preconditioner of one tensor, as the Kronecker product of its factors."""
    factors = [w[f"meta.mc.{m}.{name}"] for m in ("out", "in", "filter") if f"meta.mc.{m}.{name}" in w]
    matrix = factors[0]
    for f in factors[1:]:
        matrix = torch.kron(matrix, f)
    return matrix


def ref_meta_gradient(params: Params, batch: TaskBatch, *, first_order: bool) -> Params:
    names = [k for k in params if not k.startswith("meta.")]
    out: list[Params] = []
    for t in range(batch.num_tasks):
        everything = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        w = {k: everything[k] for k in names}
        for _ in range(STEPS):
            loss = F.cross_entropy(ref_forward(w, batch.x_support[t]), batch.y_support[t])
            g = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=not first_order)))
            w = {k: w[k] - LR * (full_matrix(everything, k) @ g[k].reshape(-1)).reshape(g[k].shape) for k in w}
        lq = F.cross_entropy(ref_forward(w, batch.x_query[t]), batch.y_query[t])
        out.append(dict(zip(everything, torch.autograd.grad(lq, list(everything.values())))))
    return {k: torch.stack([o[k] for o in out]).mean(0) for k in params}


def setup(dtype: torch.dtype, *, identity: bool = False, bias: str = "full") -> tuple[nn.Module, Params, TaskBatch]:
    torch.manual_seed(0)
    model = ConvLinear()
    theta = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
    extra = mc.extra_parameters(theta, SimpleNamespace(curvature_bias=bias))
    gen = torch.Generator().manual_seed(1)
    if not identity:
        extra = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in extra.items()}
    batch = TaskBatch(torch.randn(TASKS, SUPPORT, 2, 5, 5, generator=gen, dtype=dtype),
                      torch.randint(0, CLASSES, (TASKS, SUPPORT), generator=gen),
                      torch.randn(TASKS, QUERY, 2, 5, 5, generator=gen, dtype=dtype),
                      torch.randint(0, CLASSES, (TASKS, QUERY), generator=gen))
    return model.to(dtype), theta | extra, batch


def step(algorithm: str, model: nn.Module, params: Params, batch: TaskBatch, *, first_order: bool = False,
         vectorize: bool = True) -> Params:
    inner = InnerConfig(steps=STEPS, lr=LR, vectorize=vectorize, options={"curvature_first_order": first_order})
    return ALGORITHMS[algorithm].client_step(model, params, batch, F.cross_entropy, inner).tensors


def test_factors_are_the_papers_kronecker_shapes() -> None:
    _, params, _ = setup(torch.float32, identity=True)
    shapes = {k: tuple(v.shape) for k, v in params.items() if k.startswith("meta.")}
    assert shapes == {"meta.mc.out.conv.weight": (3, 3), "meta.mc.in.conv.weight": (2, 2),
                      "meta.mc.filter.conv.weight": (9, 9), "meta.mc.out.conv.bias": (3, 3),
                      "meta.mc.out.fc.weight": (4, 4), "meta.mc.in.fc.weight": (27, 27),
                      "meta.mc.out.fc.bias": (4, 4)}
    assert all(torch.equal(v, torch.eye(v.shape[0])) for k, v in params.items() if k.startswith("meta."))
    _, diagonal, _ = setup(torch.float32, identity=True, bias="diagonal")
    assert diagonal["meta.mc.diag.fc.bias"].tolist() == [1.0] * CLASSES and "meta.mc.out.fc.bias" not in diagonal


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_meta_gradient_matches_the_kronecker_reference(first_order: bool, vectorize: bool) -> None:
    model, params, batch = setup(torch.float64)
    got = step("metacurvature", model, params, batch, first_order=first_order, vectorize=vectorize)
    expected = ref_meta_gradient(params, batch, first_order=first_order)
    assert list(got) == list(params)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
    assert all(float(got[k].abs().max()) > 0 for k in params if k.startswith("meta."))  # every factor learns


def test_meta_gradient_matches_the_reference_in_float32_to_1e_5() -> None:
    model, params, batch = setup(torch.float32)
    got = step("metacurvature", model, params, batch)
    expected = ref_meta_gradient(params, batch, first_order=False)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5, msg=k)


def test_first_and_second_order_differ() -> None:
    model, params, batch = setup(torch.float64)
    second, first = step("metacurvature", model, params, batch), step("metacurvature", model, params, batch,
                                                                      first_order=True)
    assert max(float((second[k] - first[k]).abs().max()) for k in params) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_curvature_is_maml_exactly(dtype: torch.dtype) -> None:
    model, params, batch = setup(dtype, identity=True)
    curv = step("metacurvature", model, params, batch)
    maml = step("maml", model, {k: v for k, v in params.items() if not k.startswith("meta.")}, batch)
    assert set(curv) - set(maml) == {k for k in params if k.startswith("meta.")}
    for k in maml:
        assert torch.equal(curv[k], maml[k]), k
    xs, ys = batch.x_support[0], batch.y_support[0]
    adapted = ALGORITHMS["metacurvature"].adapt(model, params, xs, ys, F.cross_entropy, steps=3, lr=LR)
    plain = ALGORITHMS["maml"].adapt(model, params, xs, ys, F.cross_entropy, steps=3, lr=LR)
    assert all(torch.equal(adapted[k], plain[k]) for k in maml)


def test_adapt_uses_the_learned_curvature() -> None:
    model, params, batch = setup(torch.float64)
    xs, ys = batch.x_support[0], batch.y_support[0]
    adapted = ALGORITHMS["metacurvature"].adapt(model, params, xs, ys, F.cross_entropy, steps=1, lr=LR)
    theta = {k: params[k].clone().requires_grad_(True) for k in params if not k.startswith("meta.")}
    g = dict(zip(theta, torch.autograd.grad(F.cross_entropy(ref_forward(theta, xs), ys), list(theta.values()))))
    for k in theta:
        expected = params[k] - LR * (full_matrix(params, k) @ g[k].reshape(-1)).reshape(g[k].shape)
        torch.testing.assert_close(adapted[k], expected, rtol=1e-10, atol=1e-12, msg=k)
    assert all(torch.equal(adapted[k], params[k]) for k in params if k.startswith("meta."))


def test_fedmeta_adapt_uses_the_exported_curvature(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """An export's meta.mc.* matrices travel in model.safetensors and fedmeta-adapt adapts with them."""
    from safetensors.torch import load_file

    from fedmeta.client.adapt import main
    from fedmeta.common.algorithms import meta_parameters
    from fedmeta.common.config import RunConfig
    from fedmeta.common.models import ModelSpec, build_model
    from fedmeta.common.tasks import loss_for
    from fedmeta.server.rundir import RunDir
    from tests.unit.test_adapt import sine_rows, write_csv

    spec = ModelSpec("mlp", {"in_features": 1, "hidden": [8], "out_features": 1})
    run = RunConfig(run_id="unit", algorithm="metacurvature", task="sinusoid", model=spec, eval_steps=2, inner_lr=0.02)
    gen = torch.Generator().manual_seed(3)
    theta = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if k.startswith("meta.") else v
             for k, v in meta_parameters(run, 0).items()}
    RunDir(tmp_path / "run").export_model(theta, run, "v0")
    rows = sine_rows(10, 0)
    support = write_csv(tmp_path / "s.csv", ["x", "y"], rows)
    assert main(["--model", str(tmp_path / "run"), "--support", str(support), "--query", str(support),
                 "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    exported = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert {k for k in exported if k.startswith("meta.mc.")} == {k for k in theta if k.startswith("meta.")}
    xs = torch.tensor([[r[0]] for r in rows], dtype=torch.float32)
    ys = torch.tensor([[r[1]] for r in rows], dtype=torch.float32)
    model = build_model(spec)
    expected = ALGORITHMS["metacurvature"].adapt(model, exported, xs, ys, loss_for("sinusoid"), steps=2, lr=0.02)
    plain = ALGORITHMS["maml"].adapt(model, exported, xs, ys, loss_for("sinusoid"), steps=2, lr=0.02)
    adapted = load_file(str(tmp_path / "out" / "personalised.safetensors"))
    for k in expected:
        torch.testing.assert_close(adapted[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert max(float((adapted[k] - plain[k]).abs().max()) for k in plain) > 1e-4  # not MAML's plain SGD
