"""Matching and Relation Networks beyond the contract table: their modules are meta-parameters made
locally from data-only settings, their prediction rule takes the run's settings (in evaluation and
in fedmeta-adapt, from model.json), and a bad export or setting is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmeta.client.adapt import main
from fedmeta.common.algorithms import ALGORITHMS, configured, meta_parameters
from fedmeta.common.algorithms.matchingnet import context_support
from fedmeta.common.config import RunConfig
from fedmeta.common.models import ModelSpec, build_model
from fedmeta.common.wire import run_config_from_proto, run_config_to_proto
from fedmeta.server.rundir import RunDir
from tests.unit.test_adapt import write_csv

ENCODER = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": 8})


def _run(algorithm: str, **settings: Any) -> RunConfig:
    return RunConfig(run_id="unit", algorithm=algorithm, task="gaussian", model=ENCODER, ways=3, dim=4, **settings)


def _task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(3).repeat_interleave(2)
    return torch.randn(6, 4, generator=gen) + 3 * ys.unsqueeze(1), ys, torch.randn(5, 4, generator=gen)


def test_the_modules_are_seeded_meta_parameters_sized_by_the_settings() -> None:
    fce = meta_parameters(_run("matchingnet", matching_fce=True), 0)
    assert fce["meta.fce.g.weight_ih_l0"].shape == (32, 8) and fce["meta.fce.f.weight_ih"].shape == (32, 16)
    assert not any(k.startswith("meta.") for k in meta_parameters(_run("matchingnet"), 0))  # plain form: none
    rel = meta_parameters(_run("relationnet", relation_hidden=5), 0)
    assert rel["meta.relation.0.weight"].shape == (5, 16) and rel["meta.relation.1.weight"].shape == (1, 5)
    again = meta_parameters(_run("relationnet", relation_hidden=5), 0)
    assert all(torch.equal(rel[k], again[k]) for k in rel)
    other = meta_parameters(_run("relationnet", relation_hidden=5, seed=1), 1)
    assert not torch.equal(rel["meta.relation.0.weight"], other["meta.relation.0.weight"])


def test_the_settings_travel_in_the_run_config() -> None:
    for run in (_run("matchingnet", matching_fce=True, matching_steps=4),
                _run("relationnet", relation_loss="ce", relation_pool="mean", relation_hidden=12)):
        assert run_config_from_proto(run_config_to_proto(run)) == run


def test_full_context_embeddings_see_the_whole_support_set() -> None:
    """g(x_i, S) changes when another support example does; the plain embedding does not."""
    params = meta_parameters(_run("matchingnet", matching_fce=True), 0)
    zs = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    moved = zs.clone()
    moved[3] += 1.0
    assert float((context_support(params, zs)[0] - context_support(params, moved)[0]).abs().max()) > 1e-4


def test_predict_takes_the_runs_processing_steps() -> None:
    run1, run3 = _run("matchingnet", matching_fce=True, matching_steps=1), _run("matchingnet", matching_fce=True,
                                                                                  matching_steps=3)
    params, model = meta_parameters(run1, 0), build_model(ENCODER)
    xs, ys, xq = _task()
    one = configured(ALGORITHMS["matchingnet"], run1).predict(model, params, xs, ys, xq)  # type: ignore[misc]
    three = configured(ALGORITHMS["matchingnet"], run3).predict(model, params, xs, ys, xq)  # type: ignore[misc]
    assert float((one - three).abs().max()) > 1e-5
    with pytest.raises(ValueError, match="^--matching-steps: expected an integer from 1 to 20, got 0$"):
        configured(ALGORITHMS["matchingnet"], {"matching_steps": 0})
    with pytest.raises(ValueError, match="^--relation-pool: expected one of sum, mean, got 'max'$"):
        configured(ALGORITHMS["relationnet"], {"relation_pool": "max"})


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithm": "matchingnet", "matching_fce": True, "model": ModelSpec("conv4", {"ways": 100_000})},
     "^--matching-fce: an encoder of 100000 outputs makes the matchingnet modules"),
    ({"algorithm": "relationnet", "relation_hidden": 4096, "model": ModelSpec("conv4", {"ways": 100_000})},
     "^--relation-hidden: an encoder of 100000 outputs makes the relationnet modules"),
])
def test_a_run_config_cannot_ask_for_huge_modules(settings: dict[str, Any], message: str) -> None:
    """A RunConfig arrives in Join: the modules it sizes are bounded before anything is allocated."""
    with pytest.raises(ValueError, match=message):
        RunConfig(run_id="unit", task="omniglot", **settings)


def _export_and_data(root: Path, run: RunConfig) -> tuple[Path, Path, Path]:
    RunDir(root / "run").export_model(meta_parameters(run, 0), run, "v0")
    gen = np.random.default_rng(0)
    centres = {"a": 6.0, "b": -6.0, "c": 0.0}
    rows = [[*(centres[c] + 0.1 * gen.standard_normal(4)), c] for c in centres for _ in range(3)]
    header = ["f1", "f2", "f3", "f4", "label"]
    return root / "run", write_csv(root / "s.csv", header, rows), write_csv(root / "q.csv", header, rows[1::2])


def _refused(capsys: pytest.CaptureFixture[str], *argv: Path | str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err


def test_adapt_refuses_an_export_without_the_relation_module(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, support, query = _export_and_data(tmp_path, _run("relationnet"))
    weights = model / "model" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("meta.")}, str(weights))
    err = _refused(capsys, "--model", model, "--support", support, "--query", query, "--out", tmp_path / "out")
    assert "model.safetensors: it lacks the tensor 'meta.relation." in err, err
    assert not (tmp_path / "out").exists()


def test_adapt_refuses_a_model_json_with_bad_rule_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, support, query = _export_and_data(tmp_path, _run("matchingnet", matching_fce=True))
    spec = model / "model" / "model.json"
    meta = json.loads(spec.read_text())
    meta["run"]["matching_steps"] = 10**9
    spec.write_text(json.dumps(meta))
    err = _refused(capsys, "--model", model, "--support", support, "--query", query, "--out", tmp_path / "out")
    assert "model.json: run: --matching-steps: expected an integer from 1 to 20, got 1000000000" in err, err


@pytest.mark.parametrize("algorithm,settings", [("matchingnet", {"matching_fce": True, "matching_steps": 4}),
                                                ("relationnet", {"relation_loss": "ce", "relation_hidden": 32})])
def test_adapt_predicts_with_the_exported_modules_and_settings(algorithm: str, settings: dict[str, Any],
                                                               tmp_path: Path) -> None:
    run = _run(algorithm, **settings)
    model, support, query = _export_and_data(tmp_path, run)
    assert main([str(a) for a in ("--model", model, "--support", support, "--query", query, "--out",
                                  tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "adapt.json").read_text())
    assert report["steps"] == 0 and report["algorithm"] == algorithm
    # The probabilities are the rule's, with the run's settings: recompute them here.
    params = meta_parameters(run, 0)
    rows = [line.split(",") for line in (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]]
    xs = torch.tensor([[float(v) for v in r[:4]] for r in _csv(support)])
    ys = torch.tensor([ord(r[4]) - ord("a") for r in _csv(support)])
    xq = torch.tensor([[float(v) for v in r[:4]] for r in _csv(query)])
    rule = configured(ALGORITHMS[algorithm], run).predict
    assert rule is not None
    logits = rule(build_model(ENCODER), params, xs, ys, xq)
    probability = logits.softmax(-1).max(-1).values
    assert [r[2] for r in rows] == [f"{float(p):.4f}" for p in probability]


def _csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()[1:]]
