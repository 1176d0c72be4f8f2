"""Validation tasks (--eval-every) are disjoint from training and from the final test; the selection rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.tasks.omniglot import OmniglotTasks, validation_classes
from fedmeta.server import validation
from tests.omniglot_fixtures import write_fake_omniglot

ALPHABETS = {"Alpha": 6, "Beta": 5, "Gamma": 4, "Delta": 3, "Epsilon": 6}


@pytest.mark.parametrize("partition", ["alphabet", "characters", "iid"])
def test_omniglot_validation_classes_are_in_no_shard_and_not_in_the_test(tmp_path: Path, partition: str) -> None:
    write_fake_omniglot(tmp_path, alphabets=ALPHABETS, drawings=6, size=48)
    holders = [OmniglotTasks(tmp_path, ways=2, partition=partition, shards=2, shard=s, seed=3, rotations=False,
                             validation=True) for s in range(2)]
    val = set(holders[0].classes("val"))
    assert val and val == set(holders[1].classes("val"))  # every holder validates on the same classes
    test = set(holders[0].classes("eval"))
    train = set().union(*(h.classes("train") for h in holders))
    assert not val & train and not val & test and not train & test
    assert {c.split("/")[0] for c in val} <= {c.split("/")[0] for c in train}  # set aside within alphabets
    batch = holders[0].sample("val", num_tasks=2, shots=1, queries=2, seed=0)
    assert batch.x_support.shape[0] == 2
    # Without --eval-every nothing is set aside and there is no validation split.
    plain = [OmniglotTasks(tmp_path, ways=2, partition=partition, shards=2, shard=s, seed=3, rotations=False)
             for s in range(2)]
    assert set().union(*(h.classes("train") for h in plain)) == train | val  # only the validation classes moved
    with pytest.raises(ValueError, match="only with --eval-every"):
        plain[0].sample("val", num_tasks=1, shots=1, queries=1, seed=0)


def test_validation_classes_are_a_seeded_tenth_of_each_alphabet() -> None:
    alphabets = ["A"] * 20 + ["B"] * 3 + ["C"]
    chosen = validation_classes(alphabets, seed=0)
    assert [alphabets[i] for i in chosen].count("A") == 2 and [alphabets[i] for i in chosen].count("B") == 1
    assert "C" not in [alphabets[i] for i in chosen]  # a one-character alphabet keeps its character
    assert chosen == validation_classes(alphabets, seed=0) and chosen != validation_classes(alphabets, seed=1)


def test_due_and_better() -> None:
    run = RunConfig(run_id="r", task="gaussian", eval_every=5)
    assert [r for r in range(0, 13) if validation.due(run, r, 12)] == [5, 10, 12]
    assert not any(validation.due(RunConfig(run_id="r"), r, 12) for r in range(13))
    assert validation.better(run, 0.5, None) and not validation.better(run, float("nan"), None)
    assert validation.better(run, 0.6, validation.Best(5, 0.5)) and not validation.better(run, 0.5, validation.Best(5, 0.5))
    regression = RunConfig(run_id="r", task="sinusoid", eval_every=5)
    assert validation.better(regression, 0.4, validation.Best(5, 0.5))  # lower MSE is better
    assert validation.Best.from_json({"rounds_trained": 5, "value": float("inf")}) is None
    assert validation.Best.from_json(validation.Best(5, 0.5).to_json()) == validation.Best(5, 0.5)


def test_bad_eval_every_is_refused() -> None:
    with pytest.raises(ValueError, match="--eval-every"):
        RunConfig(run_id="r", eval_every=-1)
    with pytest.raises(ValueError, match="--val-tasks-per-client"):
        RunConfig(run_id="r", val_tasks_per_client=0)
