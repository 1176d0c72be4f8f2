"""Every algorithm of the contract table through a real federation: a real gRPC coordinator and client processes.

The rows are tests/unit/test_algorithm_contract.py's CASES: adding an algorithm there adds it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedmeta.common.algorithms import ALGORITHMS, meta_parameters
from fedmeta.common.centralized import train
from fedmeta.server.config import build
from tests.integration.conftest import wait_for
from tests.unit.test_algorithm_contract import CASES, NAMES

pytestmark = pytest.mark.integration

# Small federations: every setting here is one the coordinator also accepts as a flag.
EQUALITY = {"rounds": 2, "clients_per_round": 1, "tasks_per_client": 3, "inner_steps": 2, "seed": 11,
            "local_steps": 3, "local_lr": 0.02, "eval_tasks_per_client": 2, "eval_queries": 5}
DATA_SEED = 7


def run_federation(inprocess_server, processes, values: dict[str, Any], clients: int,  # type: ignore[no-untyped-def]
                   timeout_s: float = 120.0):
    """Start an in-process coordinator and `clients` client processes; wait for the run to finish."""
    s = inprocess_server(**values)
    procs = [processes.client(s.port, f"c{i}", DATA_SEED + i) for i in range(clients)]

    def finished() -> bool:
        if any(p.proc.poll() not in (None, 0) for p in procs):
            pytest.fail("a client failed:\n" + "\n".join(p.output()[-3000:] for p in procs))
        return s.coordinator.finished.is_set()

    wait_for(finished, timeout_s=timeout_s, what="the run to finish")
    assert s.coordinator.error is None, s.coordinator.error
    for p in procs:
        assert p.wait(30) == 0, p.output()
    assert s.coordinator.summary is not None
    return s


@pytest.mark.parametrize("name", NAMES)
def test_one_client_federation_equals_centralised_training(inprocess_server, processes, tmp_path: Path,
                                                           name: str) -> None:
    """The anchor, for every algorithm: one client, full participation == fedmeta.common.centralized.train."""
    case = CASES[name]
    values = case.flags() | EQUALITY | {"run_dir": str(tmp_path / "federated")}
    s = run_federation(inprocess_server, processes, values, clients=1)
    assert s.coordinator.summary["rounds_completed"] == EQUALITY["rounds"]
    federated = load_file(str(tmp_path / "federated" / "model" / "model.safetensors"))

    config = build(values | {"run_dir": str(tmp_path / "centralised")})
    centralised = train(config.run, outer_lr=config.outer_lr, data_seeds=[DATA_SEED])
    init = meta_parameters(config.run, config.run.seed)
    assert set(federated) == set(centralised) == set(init)  # the "meta.*" extras included (safetensors sorts keys)
    for k in federated:
        torch.testing.assert_close(federated[k], centralised[k], rtol=0, atol=1e-6, msg=k)
    assert max(float((federated[k] - init[k]).abs().max()) for k in init) > 1e-4  # the run moved theta


# Learning: 2 clients on Gaussian tasks; 5-way, chance 0.2.
LEARN = {"task": "gaussian", "ways": 5, "dim": 8, "shots": 5, "queries": 5, "tasks_per_client": 4, "inner_steps": 1,
         "rounds": 20, "clients_per_round": 2, "min_clients": 2, "local_steps": 4, "local_lr": 0.1, "seed": 3,
         "eval_tasks_per_client": 20, "eval_queries": 10}
MARGIN = 0.15  # accuracy points that adaptation (or, for the metric-based algorithms, prediction over chance) must win by


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_learns_gaussian_tasks(inprocess_server, processes, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    if not case.learns:
        pytest.skip(f"{name} is not expected to learn these tasks (see its row in test_algorithm_contract.py)")
    values = {"algorithm": case.algorithm} | case.settings | LEARN | {"run_dir": str(tmp_path / "run")}
    s = run_federation(inprocess_server, processes, values, clients=2)
    ev = s.coordinator.summary["eval"]
    assert ev["tasks"] == 2 * LEARN["eval_tasks_per_client"]
    pre, post = ev["accuracy_pre"], ev["accuracy_post"]
    if not ALGORITHMS[case.algorithm].adapts:  # metric-based, no inner loop: pre == post; they must beat chance
        assert pre == post
        assert post > 1 / LEARN["ways"] + MARGIN, ev
    else:
        assert post > pre + MARGIN, ev
