"""Meta-learning algorithms over flat {name: tensor} parameter dicts, by name."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch

from fedmeta.common.algorithms import (anil, fedavg, fomaml, maml, mamlpp, metacurvature, metasgd, perfedavg, protonet,
                                       reptile)
from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, RunConfig, UpdateKind
from fedmeta.common.settings import Setting

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    maml.ALGORITHM, fomaml.ALGORITHM, reptile.ALGORITHM, metasgd.ALGORITHM, anil.ALGORITHM, mamlpp.ALGORITHM,
    metacurvature.ALGORITHM,
    perfedavg.ALGORITHM, protonet.ALGORITHM, fedavg.ALGORITHM,
)}


def collect_options(algorithms: Iterable[Algorithm]) -> tuple[Setting, ...]:
    """Every algorithm's own settings, once each; two different declarations of one name are an error."""
    seen: dict[str, Setting] = {}
    for algorithm in algorithms:
        for o in algorithm.options:
            if seen.setdefault(o.name, o) is not o:
                raise TypeError(f"option {o.name!r} is declared twice (by {algorithm.name} and another algorithm): "
                                "share one declaration")
    return tuple(seen.values())


# RunConfig gets each as a field (sent to clients in Join), the server each as a flag and TOML key.
ALGORITHM_OPTIONS: tuple[Setting, ...] = collect_options(ALGORITHMS.values())


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def meta_parameters(run: RunConfig, seed: int, *, allowed_imports: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Everything the server meta-learns: the model's parameters, then the algorithm's extras."""
    from fedmeta.common.models import init_parameters

    params = init_parameters(run.model, seed, allowed_imports=allowed_imports)
    extra = get_algorithm(run.algorithm).extra_parameters
    return params | (extra(params, run) if extra is not None else {})


__all__ = ["ALGORITHMS", "ALGORITHM_OPTIONS", "Algorithm", "ClientUpdate", "InnerConfig", "OuterConfig", "UpdateKind", "collect_options", "get_algorithm",
           "meta_parameters"]
