"""fedmeta-adapt predicts a drawing or a CSV row the same alone as in a batch (inductive models)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmeta.client.adapt import main
from fedmeta.common.config import RunConfig
from fedmeta.common.algorithms import meta_parameters
from fedmeta.common.models import ENCODERS, ModelSpec
from fedmeta.server.rundir import RunDir
from tests.unit.test_adapt import SHAPES, image_folder, write_csv

CONV = {"in_channels": 1, "ways": 3, "hidden": 8, "image_size": 16}


def _export(root: Path, spec: ModelSpec, *, task: str, algorithm: str, ways: int = 3, **settings: Any) -> Path:
    run = RunConfig(run_id="unit", algorithm=algorithm, task=task, model=spec, ways=ways, dim=4, eval_steps=3,
                    inner_lr=0.3, **settings)
    RunDir(root).export_model(meta_parameters(run, 0), run, "v0")  # with the algorithm's "meta.*" modules
    return root


def _predict(capsys: pytest.CaptureFixture[str], model: Path, support: Path, query: Path, out: Path) -> list[list[str]]:
    assert main(["--model", str(model), "--support", str(support), "--query", str(query), "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:]


@pytest.mark.parametrize("algorithm,norm,settings", [
    ("maml", "support", {}), ("protonet", "support", {}), ("anil", "group", {}),
    ("matchingnet", "support", {"matching_fce": True, "matching_steps": 3}), ("matchingnet", "layer", {}),
    ("relationnet", "support", {}),
    ("relationnet", "group", {"relation_loss": "ce", "relation_pool": "mean", "relation_hidden": 64}),
])
def test_an_image_alone_is_predicted_as_in_its_folder(algorithm: str, norm: str, settings: dict[str, Any],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ModelSpec("conv4", CONV | {"norm": norm, "ways": 8 if algorithm in ENCODERS else 3})
    model = _export(tmp_path / "run", spec, task="omniglot", algorithm=algorithm, **settings)
    support = image_folder(tmp_path / "support", SHAPES, 2)
    folder = image_folder(tmp_path / "query", SHAPES, 3, flat=True)
    batched = _predict(capsys, model, support, folder, tmp_path / "all")
    assert len(batched) == 9
    report = json.loads((tmp_path / "all" / "adapt.json").read_text())
    assert report["transductive_bn"] is False
    assert len({probability for _, _, probability in batched}) > 1  # drawings are told apart
    for i, (name, prediction, probability) in enumerate(batched):
        alone = _predict(capsys, model, support, folder / name, tmp_path / f"one-{i}")
        assert alone == [[name, prediction, probability]]


def test_a_csv_row_alone_is_predicted_as_in_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": 3})
    model = _export(tmp_path / "run", spec, task="gaussian", algorithm="maml")
    gen = np.random.default_rng(0)
    header = ["f1", "f2", "f3", "f4", "label"]
    rows = [[*(float(v) for v in gen.standard_normal(4) + 2 * k), c] for k, c in enumerate("abc") for _ in range(2)]
    support = write_csv(tmp_path / "s.csv", header, rows)
    queries = [[*(float(v) for v in gen.standard_normal(4))] for _ in range(6)]
    batched = _predict(capsys, model, support, write_csv(tmp_path / "q.csv", header[:4], queries), tmp_path / "all")
    assert len({r[2] for r in batched}) > 1
    for i, q in enumerate(queries):
        alone = _predict(capsys, model, support, write_csv(tmp_path / f"q{i}.csv", header[:4], [q]), tmp_path / f"o{i}")
        assert alone[0][1:] == batched[i][1:]


def test_transductive_export_predicts_differently_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control: --norm batch normalises the query batch together, so a lone drawing can differ."""
    model = _export(tmp_path / "run", ModelSpec("conv4", CONV | {"norm": "batch"}), task="omniglot", algorithm="maml")
    support = image_folder(tmp_path / "support", SHAPES, 2)
    folder = image_folder(tmp_path / "query", SHAPES, 3, flat=True)
    batched = _predict(capsys, model, support, folder, tmp_path / "all")
    assert json.loads((tmp_path / "all" / "adapt.json").read_text())["transductive_bn"] is True
    alone = [_predict(capsys, model, support, folder / r[0], tmp_path / f"one-{i}")[0] for i, r in enumerate(batched)]
    assert alone != batched
    assert torch.tensor([float(r[2]) for r in alone]).ne(torch.tensor([float(r[2]) for r in batched])).any()
