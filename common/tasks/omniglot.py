"""Omniglot N-way K-shot classification (Lake et al. 2015), federated by alphabet, character or drawing.

Images are 28x28 grayscale, strokes 1.0 on a 0.0 background, as in Vinyals et al. 2016 and
Finn et al. 2017. With `rotations`, each character at 0/90/180/270 degrees is its own class
(Santoro et al. 2016), so a pool of C characters offers 4C classes; a character's rotations
always share its shard.

Held-out classes are those of `images_evaluation*` when present, else a seeded 20% of the
background alphabets. The remaining (training) classes are split into `shards` disjoint
shards by `partition_classes` / `partition_drawings`, pure functions of (seed, shards,
partition): every client computes the same split and keeps only its own shard.

Loading and the on-disk cache are in `omniglot_data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmeta.common.tasks.base import PARTITIONS, Split, TaskBatch
from fedmeta.common.tasks.omniglot_data import IMAGE_SIZE, OmniglotData, cache_dirs, load_omniglot

__all__ = ["IMAGE_SIZE", "OmniglotData", "OmniglotTasks", "cache_dirs", "holdout_alphabets", "load_omniglot",
           "partition_classes", "partition_drawings"]

HOLDOUT_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
_HOLDOUT_STREAM, _PARTITION_STREAM, _VALIDATION_STREAM = 0x0A11, 0x5A4D, 0x7A1D  # fixed: splits stay stable


# ---------------------------------------------------------------------------- partitioning

def holdout_alphabets(alphabets: Sequence[str], *, seed: int) -> list[str]:
    """The seeded 20% (at least 1) of alphabets held out for evaluation when there is no images_evaluation."""
    unique = sorted(set(alphabets))
    if len(unique) < 2:
        raise ValueError(f"Omniglot data has {len(unique)} alphabet(s) and no images_evaluation: expected at least 2 "
                         "to hold one out for evaluation; add images_evaluation.zip or more alphabets")
    k = max(1, round(HOLDOUT_FRACTION * len(unique)))
    order = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(len(unique))
    return sorted(unique[i] for i in order[:k])


def partition_classes(class_alphabets: Sequence[str], *, partition: str, shards: int, seed: int) -> list[list[int]]:
    """Indices into `class_alphabets` for each of `shards` shards; disjoint and complete, except "iid".

    "alphabet": whole alphabets, seeded order, each to the shard with fewest characters so far.
    "characters": each alphabet's characters dealt round-robin, so every shard sees every alphabet.
    "iid": every shard gets every class (and a disjoint part of its drawings: `partition_drawings`).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"--partition: expected one of {list(PARTITIONS)}, got {partition!r}")
    if shards < 1:
        raise ValueError(f"--shards: expected an integer >= 1, got {shards!r}")
    rng = np.random.default_rng([seed, _PARTITION_STREAM])
    by_alphabet: dict[str, list[int]] = {}
    for i, a in enumerate(class_alphabets):
        by_alphabet.setdefault(a, []).append(i)
    names = sorted(by_alphabet)
    out: list[list[int]] = [[] for _ in range(shards)]
    if partition == "iid":
        return [list(range(len(class_alphabets))) for _ in range(shards)]
    if partition == "alphabet":
        if len(names) < shards:
            raise ValueError(f"--partition alphabet with --shards {shards}: only {len(names)} training alphabet(s) "
                             f"to deal; use --shards <= {len(names)} or --partition characters")
        for j in rng.permutation(len(names)):
            target = min(range(shards), key=lambda s: (len(out[s]), s))
            out[target].extend(by_alphabet[names[j]])
    else:
        dealt = 0
        for name in names:
            for i in rng.permutation(by_alphabet[name]):
                out[dealt % shards].append(int(i))
                dealt += 1
    return [sorted(s) for s in out]


def validation_classes(class_alphabets: Sequence[str], *, seed: int) -> list[int]:
    """A seeded VALIDATION_FRACTION (at least 1) of each training alphabet's characters, for validation.

    Taken per alphabet so that alphabet partitions keep every alphabet; indices into
    class_alphabets.
    """
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    by_alphabet: dict[str, list[int]] = {}
    for i, a in enumerate(class_alphabets):
        by_alphabet.setdefault(a, []).append(i)
    out: list[int] = []
    for name in sorted(by_alphabet):
        members = by_alphabet[name]
        if len(members) < 2:
            continue
        k = max(1, round(VALIDATION_FRACTION * len(members)))
        out.extend(int(members[j]) for j in rng.permutation(len(members))[:k])
    return sorted(out)


def partition_drawings(counts: Sequence[int], *, shards: int, seed: int) -> list[list[np.ndarray]]:
    """For "iid": shard s gets drawings out[s][c] of class c; a seeded split of each class, sizes within 1."""
    rng = np.random.default_rng([seed, _PARTITION_STREAM, 1])
    per_class = [np.array_split(rng.permutation(n), shards) for n in counts]
    return [[np.sort(parts[s]) for parts in per_class] for s in range(shards)]


# ---------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class _Pool:
    """Classes to draw tasks from: images uint8 [drawings, 28, 28], class c = rows offsets[c] : + counts[c]."""

    names: tuple[str, ...]
    images: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def _pool(data: OmniglotData, classes: Sequence[int], drawings: dict[int, np.ndarray] | None = None) -> _Pool:
    """Copies only these classes' (and, for "iid", these drawings') rows out of the possibly memory-mapped cache."""
    offsets, names = data.offsets, data.names
    rows = [offsets[c] + (drawings[c] if drawings is not None else np.arange(data.counts[c])) for c in classes]
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return _Pool(tuple(names[c] for c in classes), torch.from_numpy(np.ascontiguousarray(data.images[flat])),
                 counts, torch.cumsum(counts, 0) - counts)


class OmniglotTasks:
    """N-way K-shot Omniglot tasks for one data holder: its shard for "train", held-out classes for "eval"."""

    classification = True

    def __init__(self, data_dir: Path, *, ways: int, partition: str, shards: int, shard: int, seed: int,
                 rotations: bool, validation: bool = False) -> None:
        if ways < 2:
            raise ValueError(f"--ways: expected at least 2 classes, got {ways}")
        if not 0 <= shard < shards:
            raise ValueError(f"shard: expected 0 <= shard < --shards {shards}, got {shard}")
        data = load_omniglot(Path(data_dir))
        self.ways, self.rotations, self.partition, self.shards = ways, rotations, partition, shards
        if "evaluation" in data.splits:
            held = [i for i, s in enumerate(data.splits) if s == "evaluation"]
        else:
            out = set(holdout_alphabets(data.alphabets, seed=seed))
            held = [i for i, a in enumerate(data.alphabets) if a in out]
        held_set = set(held)
        train = [i for i in range(len(data.splits)) if i not in held_set]
        val: list[int] = []
        if validation:  # set aside before partitioning: no client trains on them
            val_set = {train[j] for j in validation_classes([data.alphabets[i] for i in train], seed=seed)}
            val, train = sorted(val_set), [i for i in train if i not in val_set]
        mine = [train[i] for i in partition_classes([data.alphabets[i] for i in train], partition=partition,
                                                     shards=shards, seed=seed)[shard]]
        drawings: dict[int, np.ndarray] | None = None
        if partition == "iid":
            drawings_of = partition_drawings([int(data.counts[i]) for i in train], shards=shards, seed=seed)[shard]
            drawings = dict(zip(train, drawings_of))
        self._pools: dict[str, _Pool] = {"train": _pool(data, mine, drawings), "eval": _pool(data, held)}
        if validation:
            self._pools["val"] = _pool(data, val)
        splits = tuple(self._pools)
        for split in splits:
            if self.num_classes(split) < ways:
                raise ValueError(f"--ways {ways}: the {split} pool (shard {shard} of --shards {shards}, --partition "
                                 f"{partition}) has only {self.num_classes(split)} classes; lower --ways or --shards")

    def classes(self, split: Split) -> tuple[str, ...]:
        """The characters ("alphabet/character") this holder draws `split` tasks from, before rotation."""
        return self._pools[split].names

    def num_classes(self, split: Split) -> int:
        return len(self._pools[split].names) * (4 if self.rotations else 1)

    def sample(self, split: Split, *, num_tasks: int, shots: int, queries: int, seed: int,
               ways: int | None = None) -> TaskBatch:
        """x: float32 [tasks, ways * shots|queries, 1, 28, 28], y: int64 class n -> label n, classes drawn at random.

        `ways` overrides the family's (--eval-ways: test with other ways than training).
        """
        if split not in self._pools:
            raise ValueError(f"split: expected one of {sorted(self._pools)}, got {split!r}"
                             + (" (validation classes are set aside only with --eval-every)" if split == "val" else ""))
        if shots < 1 or queries < 0 or num_tasks < 1:
            raise ValueError(f"expected num_tasks >= 1, shots >= 1, queries >= 0, got {num_tasks}, {shots}, {queries}")
        pool, t, n, per = self._pools[split], num_tasks, ways or self.ways, shots + queries
        if not 2 <= n <= self.num_classes(split):
            flag = "--eval-ways" if ways else "--ways"
            raise ValueError(f"{flag} {n}: the {split} pool has {self.num_classes(split)} classes; expected 2 to that")
        least = int(pool.counts.min())
        if per > least:
            why = f" (--partition iid splits each character's drawings over --shards {self.shards})" \
                if self.partition == "iid" and split == "train" else ""
            flags = "--shots/--queries" if split == "train" else "--eval-shots/--eval-queries"
            raise ValueError(f"{flags}: shots + queries = {per} per class, but the {split} pool has only {least} "
                             f"drawings per character{why}; expected shots + queries <= {least}")
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.rand(t, self.num_classes(split), generator=gen).argsort(-1)[:, :n]  # [t, n] distinct classes
        base, turns = (chosen // 4, chosen % 4) if self.rotations else (chosen, torch.zeros_like(chosen))
        counts = pool.counts[base]
        keys = torch.rand(t, n, int(pool.counts.max()), generator=gen)
        keys[torch.arange(keys.shape[-1]) >= counts.unsqueeze(-1)] = 2.0  # past the class's drawings: never first
        rows = pool.offsets[base].unsqueeze(-1) + keys.argsort(-1)[..., :per]  # without replacement within a class
        x = pool.images[rows]  # [t, n, per, 28, 28] uint8
        for k in (1, 2, 3):
            mask = turns == k
            x[mask] = torch.rot90(x[mask], k, dims=(-2, -1))
        x = x.to(torch.float32).div_(255.0).unsqueeze(3)
        y = torch.arange(n).view(1, n, 1).expand(t, n, per)
        shape = (t, n * shots, 1, IMAGE_SIZE, IMAGE_SIZE), (t, n * queries, 1, IMAGE_SIZE, IMAGE_SIZE)
        return TaskBatch(x[:, :, :shots].reshape(shape[0]), y[:, :, :shots].reshape(t, n * shots),
                         x[:, :, shots:].reshape(shape[1]), y[:, :, shots:].reshape(t, n * queries))
