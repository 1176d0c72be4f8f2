"""Splitting a round's updates into K groups by direction (Sattler et al. 2020, Clustered FL).

CFL splits clients whose updates point apart once the joint model stops improving. Here:
spherical k-means on the unit updates u_i / |u_i|, run on their Gram matrix G_ij = cos(u_i, u_j)
(kernel k-means: |x_i - c_C|^2 = 1 - 2 mean_{j in C} G_ij + mean_{j,l in C} G_jl), from a few
deterministic farthest-first starts; the partition with the smallest within-group spread whose
every group has at least `min_size` updates wins. No valid partition: None (no split this round).
min_size >= 2 means that one client alone can never become a cluster of its own.
"""

from __future__ import annotations

import math

import torch

_ITERATIONS = 20
_STARTS = 16


def min_group_size(n: int, k: int) -> int:
    """The smallest group a split may make of n updates into k: max(2, ceil(n / 2k))."""
    return max(2, math.ceil(n / (2 * k)))


def gram(rows: torch.Tensor) -> torch.Tensor:
    """cos(u_i, u_j) of [n, d] rows, float64 [n, n] (a zero row is orthogonal to everything)."""
    r = rows.double()
    unit = r / torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min(1e-30)
    return unit @ unit.T


def _distances(g: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """|x_i - c_j|^2 in the kernel's space, [n, k]; inf for an empty group."""
    onehot = torch.nn.functional.one_hot(labels, k).double()  # [n, k]
    sizes = onehot.sum(0)
    safe = sizes.clamp_min(1.0)
    cross = (g @ onehot) / safe  # mean_{j in C} G_ij
    within = torch.einsum("jc,jl,lc->c", onehot, g, onehot) / safe**2
    d = g.diagonal().unsqueeze(1) - 2 * cross + within.unsqueeze(0)
    return torch.where(sizes > 0, d, torch.full_like(d, math.inf))


def _farthest_first(g: torch.Tensor, first: int, k: int) -> torch.Tensor:
    centres = [first]
    for _ in range(1, k):
        nearest = g[:, centres].max(dim=1).values  # similarity to the closest centre
        nearest[centres] = math.inf
        centres.append(int(nearest.argmin()))
    return g[:, centres].argmax(dim=1)


def split_groups(rows: torch.Tensor, k: int, *, min_size: int | None = None) -> list[list[int]] | None:
    """k groups of row indices (each sorted, groups ordered by their first index), or None."""
    n = rows.shape[0]
    need = min_group_size(n, k) if min_size is None else min_size
    if k < 2 or n < k * need:
        return None
    g = gram(rows)
    best: tuple[float, list[list[int]]] | None = None
    for first in range(min(n, _STARTS)):
        labels = _farthest_first(g, first, k)
        for _ in range(_ITERATIONS):
            new = _distances(g, labels, k).argmin(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        sizes = torch.bincount(labels, minlength=k)
        if int(sizes.min()) < need:
            continue
        spread = float(_distances(g, labels, k).gather(1, labels.unsqueeze(1)).sum())
        if best is None or spread < best[0] - 1e-12:
            groups = sorted(([i for i in range(n) if int(labels[i]) == c] for c in range(k)), key=lambda m: m[0])
            best = (spread, groups)
    return None if best is None else best[1]
