"""The Gaussian task family: shapes, labels, seeds, and held-out tasks from new data holders."""

from __future__ import annotations

import pytest
import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.models import default_model
from fedmeta.common.tasks import make_tasks
from fedmeta.common.tasks.gaussian import GaussianTasks, client_offset


def test_batch_shapes_labels_and_determinism() -> None:
    tasks = GaussianTasks(ways=4, dim=6, client_seed=3)
    a = tasks.sample("train", num_tasks=5, shots=2, queries=3, seed=11)
    b = tasks.sample("train", num_tasks=5, shots=2, queries=3, seed=11)
    c = tasks.sample("train", num_tasks=5, shots=2, queries=3, seed=12)
    assert a.x_support.shape == (5, 8, 6) and a.x_query.shape == (5, 12, 6)
    assert a.y_support.dtype == torch.int64 and a.y_support.shape == (5, 8) and a.y_query.shape == (5, 12)
    for t in range(5):  # every class has exactly `shots` support and `queries` query examples
        assert torch.bincount(a.y_support[t], minlength=4).tolist() == [2] * 4
        assert torch.bincount(a.y_query[t], minlength=4).tolist() == [3] * 4
    assert torch.equal(a.x_support, b.x_support) and not torch.equal(a.x_support, c.x_support)


def test_each_holder_is_shifted_by_its_own_offset_and_eval_tasks_come_from_new_ones() -> None:
    n = 400
    mine = GaussianTasks(ways=2, dim=5, client_seed=7)
    other = GaussianTasks(ways=2, dim=5, client_seed=8)
    assert not torch.allclose(client_offset(7, 5), client_offset(8, 5))
    train = mine.sample("train", num_tasks=n, shots=5, queries=5, seed=1)
    # The mean over many tasks of a holder's inputs is its offset (class means average to it).
    assert torch.allclose(train.x_query.mean(dim=(0, 1)), mine.offset, atol=0.25)
    other_train = other.sample("train", num_tasks=n, shots=5, queries=5, seed=1)
    assert torch.allclose(other_train.x_query.mean(dim=(0, 1)), other.offset, atol=0.25)
    held_out = mine.sample("eval", num_tasks=n, shots=5, queries=5, seed=1)
    per_task_centre = held_out.x_query.mean(dim=1)  # ~ that task's own (new) offset
    assert per_task_centre.std(dim=0).mean() > 0.5  # offsets differ from task to task
    assert not torch.allclose(per_task_centre.mean(dim=0), mine.offset, atol=0.25)


@pytest.mark.parametrize(("ways", "dim", "flag"), [(1, 4, "--ways"), (3, 0, "--dim")])
def test_bad_settings_name_the_flag(ways: int, dim: int, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        GaussianTasks(ways=ways, dim=dim, client_seed=0)


def test_make_tasks_builds_it_from_the_run() -> None:
    run = RunConfig(run_id="g", task="gaussian", model=default_model("gaussian", ways=3, dim=8), ways=3, dim=8)
    batch = make_tasks(run, data_seed=2).sample("train", num_tasks=2, shots=1, queries=1, seed=0)
    assert batch.x_support.shape == (2, 3, 8)
