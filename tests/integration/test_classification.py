"""Few-shot classification end to end: real coordinator and client processes on Gaussian tasks.

The Gaussian family gives every client a shifted distribution and evaluates on new
clients' shifts (see common/tasks/gaussian.py). Before adaptation a classifier cannot beat
chance (labels are exchangeable), so the test's margin is over the pre-adaptation accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARGIN = 0.25  # accuracy after 10 adaptation steps must beat accuracy before by at least this much


@pytest.mark.parametrize(("algorithm", "extra"), [
    ("maml", ["--inner-lr", "0.1"]),
    ("reptile", ["--inner-lr", "0.1", "--inner-steps", "5"]),
])
def test_meta_learning_beats_pre_adaptation_accuracy_on_gaussian_tasks(
    processes, tmp_path: Path, algorithm: str, extra: list[str]
) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--task", "gaussian", "--algorithm", algorithm, "--rounds", "60",
                              "--clients-per-round", "3", "--min-clients", "3", "--tasks-per-client", "8",
                              "--eval-tasks-per-client", "200", "--eval-steps", "10", *extra)
    clients = [processes.client(server.port, f"site-{i}", i) for i in range(3)]
    assert server.wait(240) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    ev = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert ev["tasks"] == 600 and ev["ways"] == 5 and ev["shots"] == 5
    assert abs(ev["accuracy_pre"] - 0.2) < 0.05, ev  # chance before adaptation
    assert ev["accuracy_post"] >= ev["accuracy_pre"] + MARGIN, ev
    assert 0 < ev["ci95"] < 0.05, ev  # 600 tasks pin the mean down
    assert ev["curve_metric"] == "accuracy" and len(ev["curve"]) == 11
    # The curve and "pre" are on the first --eval-curve-tasks (10) tasks of each client, "post" on all 200.
    assert ev["curve_tasks"] == ev["pre_tasks"] == 30
    assert ev["curve"][0] == pytest.approx(ev["accuracy_pre"]) and abs(ev["curve"][-1] - ev["accuracy_post"]) < 0.1
    assert ev["curve"][-1] > ev["curve"][1] > ev["curve"][0]
    assert ev["transductive_bn"] is False
    assert ev["by_shots"]["5"] == pytest.approx(ev["accuracy_post"]) and ev["by_shots"]["1"] < ev["by_shots"]["5"]
    assert sorted(ev["per_client"]) == ["site-0", "site-1", "site-2"]
    for report in ev["per_client"].values():
        assert report["tasks"] == 200 and report["accuracy_post"] > report["accuracy_pre"]
        assert 1 <= report["steps_to_90pct"] <= 10
    assert "accuracy" in server.output() and "95% CI" in server.output()


def test_meta_trained_initialisation_adapts_better_than_a_random_one(processes, tmp_path: Path) -> None:
    """What meta-learning buys: the same 10 adaptation steps from theta_0 vs from the meta-learned theta."""
    runs = {}
    for name, rounds in (("untrained", "1"), ("trained", "60")):
        run_dir = tmp_path / name
        server = processes.server(run_dir, "--task", "gaussian", "--rounds", rounds, "--clients-per-round", "2",
                                  "--tasks-per-client", "8", "--eval-tasks-per-client", "150", "--inner-lr", "0.1",
                                  "--outer-lr", "1e-9" if rounds == "1" else "0.003")
        clients = [processes.client(server.port, f"c{i}", i) for i in range(2)]
        assert server.wait(240) == 0, server.output()
        for c in clients:
            assert c.wait(30) == 0, c.output()
        runs[name] = json.loads((run_dir / "summary.json").read_text())["eval"]
    gain = runs["trained"]["accuracy_post"] - runs["untrained"]["accuracy_post"]
    assert gain > runs["trained"]["ci95"] + runs["untrained"]["ci95"], runs


def test_centralized_mode_reproduces_the_federation_with_full_participation(tmp_path: Path) -> None:
    """`--mode centralized` pools the same clients' task samplers: same model, same evaluation."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    flags = ["--task", "gaussian", "--algorithm", "fomaml", "--rounds", "6", "--local-clients", "2",
             "--tasks-per-client", "4", "--eval-tasks-per-client", "20", "--inner-lr", "0.1", "--no-progress"]
    summaries = {}
    for mode in ("federated", "centralized"):
        run_dir = tmp_path / mode
        done = subprocess.run([sys.executable, "-m", "fedmeta.server", "--mode", mode, "--run-dir", str(run_dir), *flags],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        summaries[mode] = json.loads((run_dir / "summary.json").read_text())
    fed = load_file(str(tmp_path / "federated" / "model" / "model.safetensors"))
    central = load_file(str(tmp_path / "centralized" / "model" / "model.safetensors"))
    assert fed.keys() == central.keys()
    for name in fed:
        torch.testing.assert_close(fed[name], central[name], rtol=0, atol=1e-6)
    f, c = summaries["federated"], summaries["centralized"]
    assert (f["mode"], c["mode"]) == ("federated", "centralized")
    assert c["eval"]["tasks"] == f["eval"]["tasks"] == 40
    assert c["eval"]["accuracy_post"] == pytest.approx(f["eval"]["accuracy_post"], abs=1e-6)
    assert sorted(c["eval"]["per_client"]) == sorted(f["eval"]["per_client"]) == ["local-0", "local-1"]
    assert c["bytes_sent"] == 0 and f["bytes_sent"] > 0
