"""fedmeta-adapt --fine-tune-steps on real exported models: early-stopped Adam past the few-shot steps.

The models are meta-trained (a few centralised rounds, common/centralized.py) and exported by
the coordinator's own exporter (server/rundir.py); every check reads what fedmeta-adapt wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmeta.client.adapt import main
from fedmeta.common.algorithms import ALGORITHMS, meta_parameters
from fedmeta.common.centralized import train
from fedmeta.common.config import RunConfig
from fedmeta.common.models import ModelSpec, build_model
from fedmeta.server.rundir import RunDir
from tests.unit.test_adapt import run_ok, sine_rows, write_csv

SINE = ModelSpec("mlp", {"in_features": 1, "hidden": [16, 16], "out_features": 1})


def exported(root: Path, algorithm: str, *, task: str, spec: ModelSpec, rounds: int) -> Path:
    """Meta-train `rounds` centralised rounds and export as fedmeta-server does."""
    run = RunConfig(run_id="unit", algorithm=algorithm, task=task, model=spec, ways=3, dim=4, shots=3, queries=3,
                    tasks_per_client=2, inner_steps=1, eval_steps=3, rounds=max(1, rounds),
                    inner_lr=0.02 if task == "sinusoid" else 0.3)
    theta = train(run, outer_lr=3e-3, data_seeds=[0]) if rounds else meta_parameters(run, 0)
    RunDir(root).export_model(theta, run, "v1")
    return root


def adapt(capsys: pytest.CaptureFixture[str], run: Path, support: Path, query: Path, out: Path,
          *flags: object) -> tuple[dict, str]:  # type: ignore[type-arg]
    printed = run_ok(capsys, "--model", run, "--support", support, "--query", query, "--out", out, *flags)
    return json.loads((out / "adapt.json").read_text()), printed


def test_regression_fine_tuning_improves_the_held_out_loss_and_reports_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = exported(tmp_path / "run", "maml", task="sinusoid", spec=SINE, rounds=10)
    rows = sine_rows(40, 0)
    support = write_csv(tmp_path / "s.csv", ["x", "y"], rows)
    query = write_csv(tmp_path / "q.csv", ["x", "y"], sine_rows(20, 1))
    report, printed = adapt(capsys, run, support, query, tmp_path / "out", "--fine-tune-steps", "150",
                            "--fine-tune-lr", "0.01")
    ft = report["fine_tune"]
    assert (ft["fit_examples"], ft["holdout_examples"], ft["steps_run"]) == (32, 8, 150)
    assert ft["holdout_loss"] < ft["holdout_loss_adapted"]  # more data, more steps: better on the held-out slice
    assert 0 < ft["best_step"] <= 150
    assert {"query_mse_pre", "query_mse_adapted", "query_mse"} <= set(report)
    assert "fine-tuning" in printed and "held-out loss" in printed and "(meta-learned steps)" in printed

    # The written parameters score the reported held-out loss on the held-out rows (recomputed here).
    held = [int(n) for n in ft["holdout"]]
    assert len(set(held)) == 8
    x = torch.tensor([[rows[i][0]] for i in held], dtype=torch.float32)
    y = torch.tensor([[rows[i][1]] for i in held], dtype=torch.float32)
    tuned = load_file(str(tmp_path / "out" / "personalised.safetensors"))
    with torch.no_grad():
        value = float(torch.func.functional_call(build_model(SINE), tuned, (x,)).sub(y).pow(2).mean())
    assert value == pytest.approx(ft["holdout_loss"], rel=1e-5)


@pytest.mark.parametrize("patience", [None, "2"])
def test_early_stopping_never_returns_worse_than_the_start(patience: str | None, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An lr that wrecks the model: the best held-out loss is the start's, and the start is what is written."""
    run = exported(tmp_path / "run", "maml", task="sinusoid", spec=SINE, rounds=10)
    support = write_csv(tmp_path / "s.csv", ["x", "y"], sine_rows(20, 0))
    query = write_csv(tmp_path / "q.csv", ["x", "y"], sine_rows(5, 1))
    flags = ["--fine-tune-steps", "30", "--fine-tune-lr", "50"] + (["--fine-tune-patience", patience] if patience else [])
    report, _ = adapt(capsys, run, support, query, tmp_path / "tuned", *flags)
    ft = report["fine_tune"]
    assert ft["best_step"] == 0 and ft["holdout_loss"] == ft["holdout_loss_adapted"]
    assert ft["steps_run"] == (2 if patience else 30)
    assert report["query_mse"] == report["query_mse_adapted"]
    # What is written is the algorithm's own few-shot adaptation on the fit part of the support set.
    fit = [r for i, r in enumerate(sine_rows(20, 0)) if str(i) not in ft["holdout"]]
    fit_csv = write_csv(tmp_path / "fit.csv", ["x", "y"], fit)
    adapt(capsys, run, fit_csv, query, tmp_path / "few-shot")
    tuned = load_file(str(tmp_path / "tuned" / "personalised.safetensors"))
    few_shot = load_file(str(tmp_path / "few-shot" / "personalised.safetensors"))
    assert all(torch.equal(tuned[k], few_shot[k]) for k in few_shot)


def gaussian_rows(per_class: int, seed: int) -> list[list[object]]:
    gen = np.random.default_rng(seed)
    centres = {"a": 1.0, "b": -1.0, "c": 0.0}
    return [[*(centres[c] + gen.standard_normal(4)), c] for c in centres for _ in range(per_class)]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_fine_tunes_with_a_held_out_example_per_class(
        algorithm: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ProtoNets included: the embedding is fine-tuned with the prototypical loss of the fit part."""
    out_features = 8 if algorithm == "protonet" else 3
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": out_features})
    run = exported(tmp_path / "run", algorithm, task="gaussian", spec=spec, rounds=3)
    header = ["f1", "f2", "f3", "f4", "label"]
    support = write_csv(tmp_path / "s.csv", header, gaussian_rows(6, 0))
    query = write_csv(tmp_path / "q.csv", header, gaussian_rows(4, 1))
    report, printed = adapt(capsys, run, support, query, tmp_path / "out", "--fine-tune-steps", "40",
                            "--fine-tune-lr", "0.01", "--fine-tune-holdout", "0.2")
    ft = report["fine_tune"]
    held = {int(n) // 6 for n in ft["holdout"]}  # rows 0-5 are class a, 6-11 b, 12-17 c
    assert held == {0, 1, 2} and ft["holdout_examples"] == 3 and ft["fit_examples"] == 15
    assert ft["holdout_loss"] <= ft["holdout_loss_adapted"]
    assert {"query_accuracy_pre", "query_accuracy_adapted", "query_accuracy"} <= set(report)
    assert 0.0 <= ft["holdout_accuracy"] <= 1.0 and "held-out accuracy" in printed
    theta = load_file(str(run / "model" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "out" / "personalised.safetensors"))
    assert all(torch.equal(tuned[k], theta[k]) for k in theta if k.startswith("meta."))  # extras as learned
    if ft["best_step"] > 0:
        assert any(not torch.equal(tuned[k], theta[k]) for k in theta if not k.startswith("meta."))
        assert ft["holdout_loss"] < ft["holdout_loss_adapted"]  # kept only because it was better


BAD = {
    "negative steps": (["--fine-tune-steps", "-1"], "--fine-tune-steps: expected an integer >= 0"),
    "zero lr": (["--fine-tune-steps", "5", "--fine-tune-lr", "0"], "--fine-tune-lr: expected a positive"),
    "nan lr": (["--fine-tune-steps", "5", "--fine-tune-lr", "nan"], "--fine-tune-lr: expected a positive"),
    "holdout 1": (["--fine-tune-steps", "5", "--fine-tune-holdout", "1"], "--fine-tune-holdout: expected a fraction"),
    "holdout 0": (["--fine-tune-steps", "5", "--fine-tune-holdout", "0"], "--fine-tune-holdout: expected a fraction"),
    "negative patience": (["--fine-tune-steps", "5", "--fine-tune-patience", "-1"], "--fine-tune-patience: expected"),
    "lr without steps": (["--fine-tune-lr", "0.1"], "--fine-tune-lr: only applies with --fine-tune-steps"),
    "one example per class": (["--fine-tune-steps", "5"], "--fine-tune-holdout: class 'a' has 1 example(s)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fine_tuning_flags_exit_2_with_one_line_naming_the_flag(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags, expected = BAD[case]
    per_class = 1 if case == "one example per class" else 4
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [8], "out_features": 3})
    run = exported(tmp_path / "run", "maml", task="gaussian", spec=spec, rounds=0)
    header = ["f1", "f2", "f3", "f4", "label"]
    support = write_csv(tmp_path / "s.csv", header, gaussian_rows(per_class, 0))
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["--model", run, "--support", support, "--query", support, "--out", tmp_path / "out",
                               *flags]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmeta-adapt: error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
