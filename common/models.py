"""The model zoo: models are named by a ModelSpec and built deterministically from a seed."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A model name from the zoo (or "package.module:Class") and its constructor arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "kwargs": self.kwargs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        return cls(name=str(data["name"]), kwargs=dict(data.get("kwargs", {})))


class MLP(nn.Module):
    """Fully connected ReLU network; the default 1-40-40-1 is Finn et al. 2017's sinusoid model."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)


NORMS = ("support", "group", "layer", "batch")  # Conv4's normalisations; the first is the default


class SupportNorm2d(nn.Module):
    """Batch norm with the statistics of a task's support set only (MetaBN, Bronskill et al. 2020).

    y = gamma * (x - mu_S) / sqrt(var_S + eps) + beta, with mu_S, var_S per channel over the
    first `n_stats` examples of x ([N, C, H, W]) and all spatial positions; the other
    examples (queries) are normalised with them, so a query's output depends on the support
    set and itself, never on the other queries. Without `n_stats` every example counts (the
    support set alone: plain batch norm). Parameters `weight`, `bias` as nn.BatchNorm2d's.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, n_stats: int | None = None) -> torch.Tensor:
        if n_stats is None:  # the support set alone: batch norm, with torch's fused kernel
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        ref = x[:n_stats]
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        var = ref.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "support":
        return SupportNorm2d(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"--norm: expected one of {', '.join(NORMS)}, got {norm!r}")


class Conv4(nn.Module):
    """The few-shot vision backbone of Vinyals et al. 2016 / Finn et al. 2017 with a linear head.

    4 x [conv 3x3 (`hidden` filters, padding 1), norm, ReLU, max-pool 2x2], flatten, linear
    to `ways` logits. `norm` (each with a learned per-channel scale `weight` and shift `bias`):

    - "support" (default): batch norm with the statistics of the task's support set, also
      applied to its queries (MetaBN, Bronskill et al. 2020). Queries are predicted with
      `forward(xq, context=xs)`; a forward pass without context normalises with its own
      batch (the support set's pass while adapting). Inductive.
    - "group" / "layer": group norm (min(8, hidden) groups, Wu & He 2018) / layer norm over
      (C, H, W) (GroupNorm with one group): per example, no batch dependence. Inductive.
    - "batch": batch norm with the statistics of whatever batch it is given, no running
      statistics (MAML's reference code): transductive, a prediction depends on the other
      queries, and a lone query is normalised with its own statistics (instance norm), which
      erases much of what tells drawings apart.

    The head is `head.weight` and `head.bias` (ANIL adapts only it); parameter names and
    shapes are the same for every norm.
    """

    head_parameters = ("head.weight", "head.bias")
    # Measured on a 2-core CPU, 5-way 1-shot, 8 tasks: vmap 5.9 s against 1.1 s looping (MAML).
    vmap_default = False

    def __init__(self, in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28,
                 norm: str = NORMS[0]) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                _norm_layer(norm, hidden),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings")
        self.norm = norm
        self.takes_context = norm == "support"
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * size * size, ways)

    def embed(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened features of x; with `context` (support norm), normalised with the context's statistics."""
        if context is None or not self.takes_context:
            return self.features(x).flatten(1)
        n = context.shape[0]
        h = torch.cat([context, x])
        for layer in self.features:
            h = layer(h, n) if isinstance(layer, SupportNorm2d) else layer(h)
        return h[n:].flatten(1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(x, context))


ZOO: dict[str, type[nn.Module]] = {"conv4": Conv4, "mlp": MLP}


def head_parameters(model: nn.Module) -> tuple[str, ...]:
    """Names of the parameters that form the model's head: declared, else the last layer's."""
    declared = getattr(model, "head_parameters", None)
    if declared is not None:
        return tuple(declared)
    names = [name for name, _ in model.named_parameters()]
    if not names:
        return ()
    prefix = names[-1].rpartition(".")[0]
    return tuple(n for n in names if n.rpartition(".")[0] == prefix)


def prefers_vmap(model: nn.Module) -> bool:
    """Whether a meta-batch runs faster batched with torch.func.vmap than looped, for this model."""
    return bool(getattr(model, "vmap_default", True))


def takes_context(model: nn.Module) -> bool:
    """Whether the model normalises queries with the support set's statistics: forward(x, context=support)."""
    return bool(getattr(model, "takes_context", False))


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether the model normalises with the statistics of each batch (transductive evaluation)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules())


EMBEDDING = 64  # output size of an encoder trained by a metric-based algorithm (it has no classification head)
ENCODERS = ("protonet", "matchingnet", "relationnet")  # the algorithms whose model is such an encoder


def default_model(task: str, *, ways: int = 5, dim: int = 16, name: str | None = None,
                  algorithm: str = "maml", norm: str | None = None) -> ModelSpec:
    """The model a task family uses unless the user names another (metric-based algorithms: a 64-d encoder).

    `norm` is Conv4's normalisation (see Conv4); other models have none to choose.
    """
    if norm is not None and norm not in NORMS:
        raise ValueError(f"--norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    if algorithm in ENCODERS:
        ways = EMBEDDING
    name = name or {"sinusoid": "mlp", "gaussian": "mlp", "omniglot": "conv4"}.get(task, "mlp")
    if name == "conv4":
        return ModelSpec("conv4", {"in_channels": 1, "ways": ways, "hidden": 64, "image_size": 28,
                                   "norm": norm or NORMS[0]})
    if norm is not None:
        raise ValueError(f"--norm {norm}: only the conv4 model has a normalisation to choose; {name} has none")
    if name == "mlp":
        if task == "sinusoid":
            return ModelSpec("mlp", {"in_features": 1, "hidden": [40, 40], "out_features": 1})
        if task == "gaussian":
            return ModelSpec("mlp", {"in_features": dim, "hidden": [64, 64], "out_features": ways})
        if task == "omniglot":
            return ModelSpec("mlp", {"in_features": 28 * 28, "hidden": [256, 128, 64], "out_features": ways})
    raise ValueError(f"--model: expected one of {sorted(ZOO)}, got {name!r}")


# The most parameters a model spec may ask for: 2**29 float32 values (2 GiB), the coordinator's
# default --max-update-bytes. A spec is checked against it before anything is allocated.
MAX_PARAMETERS = 1 << 29
IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def _int_arg(name: str, key: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"model {name!r}: {key}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _mlp_parameters(kwargs: dict[str, Any]) -> int:
    in_features = _int_arg("mlp", "in_features", kwargs.get("in_features", 1), 1, 1 << 20)
    out_features = _int_arg("mlp", "out_features", kwargs.get("out_features", 1), 1, 1 << 20)
    hidden = kwargs.get("hidden", [40, 40])
    if not isinstance(hidden, (list, tuple)) or len(hidden) > 64:
        raise ValueError(f"model 'mlp': hidden: expected a list of at most 64 layer widths, got {hidden!r}")
    sizes = [in_features, *(_int_arg("mlp", "hidden", h, 1, 1 << 16) for h in hidden), out_features]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _conv4_parameters(kwargs: dict[str, Any]) -> int:
    channels = _int_arg("conv4", "in_channels", kwargs.get("in_channels", 1), 1, 64)
    ways = _int_arg("conv4", "ways", kwargs.get("ways", 5), 1, 100_000)
    hidden = _int_arg("conv4", "hidden", kwargs.get("hidden", 64), 1, 4096)
    size = _int_arg("conv4", "image_size", kwargs.get("image_size", 28), 16, 1024)
    if kwargs.get("norm", NORMS[0]) not in NORMS:
        raise ValueError(f"model 'conv4': norm: expected one of {', '.join(NORMS)}, got {kwargs['norm']!r}")
    blocks = (channels * hidden * 9 + hidden) + 3 * (hidden * hidden * 9 + hidden) + 4 * 2 * hidden
    return blocks + hidden * (size // 16) ** 2 * ways + ways


# Each zoo model's keyword arguments, and its parameter count computed from them without building it.
_ZOO_ARGS: dict[str, tuple[frozenset[str], Any]] = {
    "mlp": (frozenset({"in_features", "hidden", "out_features"}), _mlp_parameters),
    "conv4": (frozenset({"in_channels", "ways", "hidden", "image_size", "norm"}), _conv4_parameters),
}


def check_model_spec(spec: ModelSpec, *, allowed_imports: Collection[str] = ()) -> None:
    """Refuse a spec this process must not build: code is chosen only locally.

    A zoo name takes only its own keyword arguments, of sane types and ranges, for at most
    MAX_PARAMETERS parameters. An import path "module:Class" runs code on this machine, so it
    is built only when this process's operator named exactly it (`--allow-model-import`).
    Raises ValueError with a one-line reason.
    """
    if not isinstance(spec.kwargs, dict) or not all(isinstance(k, str) for k in spec.kwargs):
        raise ValueError(f"model {spec.name!r}: expected keyword arguments as a JSON object, got {spec.kwargs!r}")
    if spec.name in _ZOO_ARGS:
        known, count = _ZOO_ARGS[spec.name]
        unknown = sorted(set(spec.kwargs) - known)
        if unknown:
            raise ValueError(f"model {spec.name!r}: unknown arguments {unknown}; expected some of {sorted(known)}")
        parameters = count(spec.kwargs)
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"model {spec.name!r}: {spec.kwargs!r} makes {parameters:,} parameters; at most "
                             f"{MAX_PARAMETERS:,} are allowed")
        return
    if ":" not in spec.name:
        raise ValueError(f"unknown model {spec.name!r}: expected one of {sorted(ZOO)}, or an import path "
                         "'module:Class' this process allows with --allow-model-import")
    if spec.name not in allowed_imports:
        raise ValueError(f"model {spec.name!r}: an import path runs code on this machine and this process "
                         f"allows none by that name; expected one of {sorted(ZOO)} (an operator who trusts "
                         f"it passes --allow-model-import {spec.name})")


def check_import_paths(paths: Collection[str]) -> frozenset[str]:
    """Validate --allow-model-import values: each exactly "package.module:Class"."""
    for path in paths:
        if not IMPORT_PATH.match(path):
            raise ValueError(f"--allow-model-import: expected package.module:Class, got {path!r}")
    return frozenset(paths)


def build_model(spec: ModelSpec, *, allowed_imports: Collection[str] = ()) -> nn.Module:
    """Instantiate a model from the zoo or, where `allowed_imports` names it, from an import path "module:Class".

    The spec is checked first (check_model_spec), so nothing is imported or allocated for a
    spec this process refuses.
    """
    check_model_spec(spec, allowed_imports=allowed_imports)
    if ":" in spec.name:
        module_name, _, attr = spec.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {spec.name!r}: cannot import it ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"model {spec.name!r}: expected a torch.nn.Module subclass, got {cls!r}")
    else:
        cls = ZOO[spec.name]
    try:
        return cls(**spec.kwargs)
    except TypeError as exc:
        raise ValueError(f"model {spec.name!r}: bad arguments {spec.kwargs!r} ({exc})") from exc


def init_parameters(spec: ModelSpec, seed: int, *, allowed_imports: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The model's initial parameters as a flat {name: tensor} dict, seeded."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(spec, allowed_imports=allowed_imports)
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.detach().clone() for k, v in model.named_parameters()}
