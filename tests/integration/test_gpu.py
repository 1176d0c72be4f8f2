"""The GPU path: `--local-device cuda` clients run the Omniglot benchmark's split end to end (skips without CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]

DATA = Path(os.environ.get("FEDMETA_OMNIGLOT_DIR", ROOT.parent / "shared" / "data" / "omniglot"))


@pytest.mark.skipif(not (DATA / "images_background_small2.zip").exists(), reason="no small Omniglot archives")
def test_cuda_clients_run_the_omniglot_benchmark_split(tmp_path: Path) -> None:
    from benchmarks.omniglot import make_split

    split = make_split(DATA, tmp_path)
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fedmeta.server", "--task", "omniglot", "--data-dir", str(split),
                           "--algorithm", "maml", "--local-clients", "5", "--shards", "5", "--local-device", "cuda",
                           "--shots", "1", "--eval-shots", "1", "--rounds", "5", "--tasks-per-client", "2",
                           "--eval-tasks-per-client", "4", "--run-dir", str(run_dir), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 5 and summary["eval"]["tasks"] == 20
    assert done.stderr.count("(device cuda:0)") + done.stderr.count("(device cuda)") == 5, done.stderr
