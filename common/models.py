"""The model zoo: models are named by a ModelSpec and built deterministically from a seed."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
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


class Conv4(nn.Module):
    """The few-shot vision backbone of Vinyals et al. 2016 / Finn et al. 2017 with a linear head.

    4 x [conv 3x3 (`hidden` filters, padding 1), batch norm, ReLU, max-pool 2x2], flatten,
    linear to `ways` logits. Batch norm has learned scale and shift but no running
    statistics: it always normalises with the statistics of the batch it sees
    (transductive, as in MAML's reference code), so one task's support or query set is
    normalised together. The head is `head.weight` and `head.bias` (ANIL adapts only it).
    """

    head_parameters = ("head.weight", "head.bias")
    # Measured on a 2-core CPU, 5-way 1-shot, 8 tasks: vmap 5.9 s against 1.1 s looping (MAML).
    vmap_default = False

    def __init__(self, in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * size * size, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


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


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether the model normalises with the statistics of each batch (transductive evaluation)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules())


EMBEDDING = 64  # output size of an encoder trained by ProtoNets (it has no classification head)


def default_model(task: str, *, ways: int = 5, dim: int = 16, name: str | None = None,
                  algorithm: str = "maml") -> ModelSpec:
    """The model a task family uses unless the user names another (ProtoNets: a 64-d encoder)."""
    if algorithm == "protonet":
        ways = EMBEDDING
    name = name or {"sinusoid": "mlp", "gaussian": "mlp", "omniglot": "conv4"}.get(task, "mlp")
    if name == "conv4":
        return ModelSpec("conv4", {"in_channels": 1, "ways": ways, "hidden": 64, "image_size": 28})
    if name == "mlp":
        if task == "sinusoid":
            return ModelSpec("mlp", {"in_features": 1, "hidden": [40, 40], "out_features": 1})
        if task == "gaussian":
            return ModelSpec("mlp", {"in_features": dim, "hidden": [64, 64], "out_features": ways})
        if task == "omniglot":
            return ModelSpec("mlp", {"in_features": 28 * 28, "hidden": [256, 128, 64], "out_features": ways})
    raise ValueError(f"--model: expected one of {sorted(ZOO)}, got {name!r}")


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate a model from the zoo or from an import path "module:Class"."""
    if ":" in spec.name:
        module_name, _, attr = spec.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {spec.name!r}: cannot import it ({exc})") from exc
    elif spec.name in ZOO:
        cls = ZOO[spec.name]
    else:
        raise ValueError(f"unknown model {spec.name!r}: expected one of {sorted(ZOO)} or 'module:Class'")
    try:
        return cls(**spec.kwargs)
    except TypeError as exc:
        raise ValueError(f"model {spec.name!r}: bad arguments {spec.kwargs!r} ({exc})") from exc


def init_parameters(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """The model's initial parameters as a flat {name: tensor} dict, seeded."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(spec)
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.detach().clone() for k, v in model.named_parameters()}
