"""Checkpoints are verified on resume, with real processes: a poisoned newest checkpoint is skipped."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedmeta.server import checkpoint
from tests.integration.conftest import wait_for
from tests.integration.test_failures import FAST, _free_port, _rounds

pytestmark = pytest.mark.integration

def test_nan_in_the_newest_checkpoint_resumes_from_the_previous_one(processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoint"
    flags = ["--port", str(_free_port()), "--rounds", "12", "--clients-per-round", "2", "--min-clients", "2", *FAST]
    server = processes.server(run_dir, *flags)
    clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
    wait_for(lambda: len(_rounds(run_dir)) >= 4, timeout_s=90, what="four rounds")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)

    newest, previous = checkpoint.path_of(ckpt_dir, 0), checkpoint.path_of(ckpt_dir, 1)
    assert newest.exists() and previous.exists()
    with safe_open(str(newest), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(newest))
    tensors["theta"][7] = float("nan")  # a bit flip, a bad disk, or someone editing the run directory
    save_file(tensors, str(newest), metadata=metadata)
    fallback_round = checkpoint.read(previous).meta["next_round"]
    assert fallback_round == json.loads(metadata["fedmeta"])["next_round"] - 1

    restarted = processes.server(run_dir, *flags)
    assert restarted.wait(180) == 0, restarted.output()
    out = restarted.output()
    assert "non-finite" in out and "trying the previous checkpoint" in out, out
    assert f"from its checkpoint: next round {fallback_round} of 12" in out, out
    for c in clients:
        assert c.wait(60) == 0, c.output()
    rounds = [r["round"] for r in _rounds(run_dir)]
    assert rounds == list(range(12)), f"each round recorded once after the fallback: {rounds}"
    final = checkpoint.load(ckpt_dir)
    assert final is not None and final.meta["next_round"] == 12 and bool(torch.isfinite(final.theta).all())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 12
