"""Meta-learning algorithms over flat {name: tensor} parameter dicts, by name."""

from __future__ import annotations

from common.algorithms import fomaml, maml, reptile
from common.algorithms.base import Algorithm, ClientUpdate, InnerConfig, OuterConfig, UpdateKind

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (maml.ALGORITHM, fomaml.ALGORITHM, reptile.ALGORITHM)}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "InnerConfig", "OuterConfig", "UpdateKind", "get_algorithm"]
