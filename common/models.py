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
        return self.net(x)


ZOO: dict[str, type[nn.Module]] = {"mlp": MLP}


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
