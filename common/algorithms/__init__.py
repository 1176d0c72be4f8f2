"""Meta-learning algorithms over flat {name: tensor} parameter dicts, by name."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from common.algorithms import anil, fedavg, fomaml, maml, mamlpp, metasgd, perfedavg, protonet, reptile
from common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, UpdateKind

if TYPE_CHECKING:
    from common.config import RunConfig

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    maml.ALGORITHM, fomaml.ALGORITHM, reptile.ALGORITHM, metasgd.ALGORITHM, anil.ALGORITHM, mamlpp.ALGORITHM,
    perfedavg.ALGORITHM, protonet.ALGORITHM, fedavg.ALGORITHM,
)}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def meta_parameters(run: RunConfig, seed: int, *, allowed_imports: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Everything the server meta-learns: the model's parameters, then the algorithm's extras."""
    from common.models import init_parameters

    params = init_parameters(run.model, seed, allowed_imports=allowed_imports)
    extra = get_algorithm(run.algorithm).extra_parameters
    return params | (extra(params, run) if extra is not None else {})


__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "InnerConfig", "OuterConfig", "UpdateKind", "get_algorithm",
           "meta_parameters"]
