"""Whole runs with a real coordinator process and real client processes on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAST = ["--tasks-per-client", "4", "--eval-tasks-per-client", "5", "--eval-queries", "20"]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_three_clients_run_each_algorithm(processes, tmp_path: Path, algorithm: str) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--algorithm", algorithm, "--rounds", "5", "--clients-per-round", "3",
                              "--min-clients", "3", *FAST)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(3)]
    assert server.wait(120) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == algorithm
    assert summary["rounds_completed"] == 5
    assert summary["clients_seen"] == 3
    assert summary["eval"]["tasks"] == 15
    assert summary["eval"]["loss_pre"] > 0 and summary["eval"]["loss_post"] > 0
    assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    assert 0 < summary["eval_s"] < summary["wall_s"]  # the evaluation round's share of the run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(5))
    assert all(r["clients_answered"] == 3 and r["seed"] == 0 for r in records)
    assert len({r["version"] for r in records}) == 5
    assert (run_dir / "model" / "model.safetensors").exists()
    assert json.loads((run_dir / "model" / "model.json").read_text())["algorithm"] == algorithm
    assert "fedmeta run" in server.output() and "MSE" in server.output()


def test_one_client_federation_reproduces_centralised_run(processes, tmp_path: Path) -> None:
    """The correctness anchor: one client, full participation == the centralised algorithm."""
    import torch
    from safetensors.torch import load_file

    from fedmeta.common.centralized import train
    from fedmeta.server.config import build

    rounds, data_seed = 3, 7
    flags = {"rounds": rounds, "clients_per_round": 1, "tasks_per_client": 5, "inner_steps": 2, "seed": 11}
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()], *FAST[2:])
    client = processes.client(server.port, "solo", data_seed)
    assert server.wait(120) == 0, server.output()
    assert client.wait(30) == 0, client.output()
    federated = load_file(str(run_dir / "model" / "model.safetensors"))

    config = build(flags | {"run_dir": str(tmp_path / "central")})
    centralised = train(config.run, outer_lr=config.outer_lr, data_seeds=[data_seed])
    assert federated.keys() == centralised.keys()
    for name in federated:
        torch.testing.assert_close(federated[name], centralised[name], rtol=0, atol=1e-6)
    # And the run really moved theta: three Adam steps away from the initialisation.
    from fedmeta.common.models import init_parameters

    init = init_parameters(config.run.model, config.run.seed)
    assert any((federated[n] - init[n]).abs().max() > 1e-4 for n in init)


@pytest.mark.parametrize("encoding", ["float16", "bfloat16"])
def test_reduced_precision_encoding_and_many_chunks(processes, tmp_path: Path, encoding: str) -> None:
    """Updates and parameters travel as float16/bfloat16 in 1 KiB chunks (the MLP needs 4 of them)."""
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--algorithm", "reptile", "--rounds", "4", "--clients-per-round", "2",
                              "--encoding", encoding, "--chunk-bytes", "1024", *FAST)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
    assert server.wait(120) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 4
    assert summary["config"]["encoding"] == encoding
    # Half precision on the wire: 4 rounds x 2 clients x 1761 parameters x 2 bytes of updates,
    # plus headers and polls, stays below what the float32 payloads alone would be.
    received = summary["bytes_received"]
    assert 4 * 2 * 1761 * 2 <= received < 4 * 2 * 1761 * 4, received
