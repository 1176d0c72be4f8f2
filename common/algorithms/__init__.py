"""Meta-learning algorithms over flat {name: tensor} parameter dicts, by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from fedmeta.common.algorithms import (anil, fedavg, fomaml, maml, mamlpp, matchingnet, metacurvature, metasgd,
                                       perfedavg, protonet, relationnet, reptile)
from fedmeta.common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, RunConfig, UpdateKind
from fedmeta.common.settings import Setting

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    maml.ALGORITHM, fomaml.ALGORITHM, reptile.ALGORITHM, metasgd.ALGORITHM, anil.ALGORITHM, mamlpp.ALGORITHM,
    metacurvature.ALGORITHM,
    perfedavg.ALGORITHM, protonet.ALGORITHM, matchingnet.ALGORITHM, relationnet.ALGORITHM, fedavg.ALGORITHM,
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


def configured(algorithm: Algorithm, run: RunConfig | Mapping[str, Any]) -> Algorithm:
    """The algorithm with the run's settings bound into its prediction rule (`Algorithm.bind`; most have none).

    `run`: a RunConfig, or the settings by field name (an exported model.json's "run").
    """
    if algorithm.bind is None:
        return algorithm
    options = run if isinstance(run, Mapping) else {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
    return algorithm.bind(options)


def meta_parameters(run: RunConfig, seed: int, *, allowed_imports: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Everything the server meta-learns: the model's parameters, then the algorithm's extras."""
    from fedmeta.common.models import init_parameters

    params = init_parameters(run.model, seed, allowed_imports=allowed_imports)
    extra = get_algorithm(run.algorithm).extra_parameters
    return params | (extra(params, run) if extra is not None else {})


__all__ = ["ALGORITHMS", "ALGORITHM_OPTIONS", "Algorithm", "ClientUpdate", "InnerConfig", "OuterConfig", "UpdateKind", "collect_options", "configured",
           "get_algorithm",
           "meta_parameters"]
