"""Gaussian N-way classification with client-specific shifts: heterogeneous data holders, synthetic.

All clients share a hidden low-dimensional structure: class means lie in a
`LATENT`-dimensional subspace of R^dim, spanned by a fixed basis B (the same for every
run, so it is a property of the family, like sinusoids' amplitude range). Each data
holder c shifts everything by its own offset o_c ~ N(0, OFFSET^2 I) derived from its data
seed. A task picks `ways` classes with means m_n = o_c + B z_n, z_n ~ N(0, SEPARATION^2 I),
and examples x = m_n + NOISE * eps. Labels 0..ways-1 are assigned to classes at random, so
no fixed classifier beats chance before adaptation; an initialisation that has learned
the subspace and the offsets' scale adapts in a few steps.

"eval" (and "val") tasks come from new data holders: every held-out task draws a fresh
offset, so the evaluation measures how well a new participant is onboarded.
"""

from __future__ import annotations

import torch

from fedmeta.common.tasks.base import Split, TaskBatch

LATENT = 4
OFFSET = 1.0
SEPARATION = 1.5
NOISE = 1.0
_BASIS_SEED = 20170703  # fixed: the subspace is part of the task family's definition


def _basis(dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_BASIS_SEED + dim)
    q, _ = torch.linalg.qr(torch.randn(dim, max(dim, LATENT), generator=gen))
    return q[:, : min(LATENT, dim)]


def client_offset(client_seed: int, dim: int) -> torch.Tensor:
    """The shift of one data holder's distribution, a pure function of its data seed."""
    gen = torch.Generator().manual_seed(0x6A09E667 ^ int(client_seed))
    return OFFSET * torch.randn(dim, generator=gen)


class GaussianTasks:
    """N-way K-shot tasks in `dim` dimensions for one data holder."""

    classification = True

    def __init__(self, *, ways: int, dim: int, client_seed: int) -> None:
        if ways < 2:
            raise ValueError(f"--ways: expected at least 2 classes, got {ways}")
        if dim < 1:
            raise ValueError(f"--dim: expected at least 1, got {dim}")
        self.ways, self.dim = ways, dim
        self.basis = _basis(dim)
        self.offset = client_offset(client_seed, dim)

    def sample(self, split: Split, *, num_tasks: int, shots: int, queries: int, seed: int,
               ways: int | None = None) -> TaskBatch:
        """`ways` overrides the family's (--eval-ways: test with other ways than training)."""
        gen = torch.Generator().manual_seed(seed)
        n, d = ways or self.ways, self.dim
        if split in ("val", "eval"):
            offset = OFFSET * torch.randn(num_tasks, 1, d, generator=gen)  # a new data holder per task
        else:
            offset = self.offset.expand(num_tasks, 1, d)
        z = SEPARATION * torch.randn(num_tasks, n, self.basis.shape[1], generator=gen)
        means = offset + z @ self.basis.T  # [tasks, ways, dim]
        per_class = shots + queries
        noise = NOISE * torch.randn(num_tasks, n, per_class, d, generator=gen)
        x = means.unsqueeze(2) + noise  # [tasks, ways, per_class, dim]
        labels = torch.arange(n).view(1, n, 1).expand(num_tasks, n, per_class)
        xs, xq = x[:, :, :shots].reshape(num_tasks, n * shots, d), x[:, :, shots:].reshape(num_tasks, n * queries, d)
        ys = labels[:, :, :shots].reshape(num_tasks, n * shots)
        yq = labels[:, :, shots:].reshape(num_tasks, n * queries)
        return TaskBatch(xs.contiguous(), ys.contiguous(), xq.contiguous(), yq.contiguous())
