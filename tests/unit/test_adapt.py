"""fedmeta-adapt end to end on tiny exported models: CSV regression, CSV and image classification, bad inputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from fedmeta.client.adapt import main
from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.config import RunConfig
from fedmeta.common.images import load_image
from fedmeta.common.models import ModelSpec, build_model, init_parameters
from fedmeta.common.tasks import loss_for
from fedmeta.server.rundir import RunDir

SINE = ModelSpec("mlp", {"in_features": 1, "hidden": [16, 16], "out_features": 1})
GAUSS = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": 3})
CONV = ModelSpec("conv4", {"in_channels": 1, "ways": 3, "hidden": 8, "image_size": 16})
SHAPES = ("circle", "cross", "line")  # class folder names, already sorted


def export(root: Path, spec: ModelSpec, *, task: str, algorithm: str = "maml", ways: int = 5) -> Path:
    """A run directory holding model/ as fedmeta-server exports it."""
    run = RunConfig(run_id="unit", algorithm=algorithm, task=task, model=spec, ways=ways, dim=4,
                    eval_steps=5, inner_lr=0.02 if task == "sinusoid" else 0.3)
    RunDir(root).export_model(init_parameters(spec, 0), run, "v0")
    return root


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def sine_rows(n: int, seed: int, *, target: bool = True) -> list[list[object]]:
    gen = np.random.default_rng(seed)
    xs = gen.uniform(-5, 5, n)
    return [[x, 2.0 * math.sin(x - 0.5)] if target else [x] for x in xs]


def draw(path: Path, shape: str, jitter: int) -> None:
    """A black-on-white drawing of `shape`, 20 x 20 (the model resizes it)."""
    img = Image.new("L", (20, 20), 255)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((3 + jitter, 3, 16, 16 - jitter), outline=0, width=2)
    elif shape == "cross":
        d.line((3, 3 + jitter, 16, 16), fill=0, width=2)
        d.line((3, 16, 16, 3 + jitter), fill=0, width=2)
    else:
        d.line((2, 10 + jitter, 18, 10 + jitter), fill=0, width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def image_folder(root: Path, classes: tuple[str, ...], per_class: int, *, flat: bool = False) -> Path:
    for c in classes:
        for i in range(per_class):
            draw(root / (f"{c}-{i}.png" if flat else f"{c}/{i}.png"), c, i)
    return root


def run_ok(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def read_predictions(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- happy paths

def test_csv_regression_adapts_and_predicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", SINE, task="sinusoid")
    support = write_csv(tmp_path / "support.csv", ["x", "y"], sine_rows(10, 0))
    query = write_csv(tmp_path / "query.csv", ["x", "y"], sine_rows(7, 1))
    out = tmp_path / "out"
    printed = run_ok(capsys, "--model", run / "model", "--support", support, "--query", query, "--out", out)

    report = json.loads((out / "adapt.json").read_text())
    assert (report["steps"], report["lr"]) == (5, 0.02)  # model.json's adapt section
    assert report["support_loss_post"] < report["support_loss_pre"]
    assert math.isfinite(report["query_mse"]) and "query MSE" in printed
    rows = read_predictions(out)
    assert len(rows) == 7 and list(rows[0]) == ["row", "prediction", "target"]
    assert [r["row"] for r in rows] == [str(i) for i in range(7)]

    # personalised.safetensors is exactly the algorithm's adapt of theta on the support set
    theta = load_file(str(run / "model" / "model.safetensors"))
    xs = torch.tensor([[r[0]] for r in sine_rows(10, 0)], dtype=torch.float32)
    ys = torch.tensor([[r[1]] for r in sine_rows(10, 0)], dtype=torch.float32)
    expected = get_algorithm("maml").adapt(build_model(SINE), theta, xs, ys, loss_for("sinusoid"), steps=5, lr=0.02)
    adapted = load_file(str(out / "personalised.safetensors"))
    assert adapted.keys() == theta.keys()
    for k in theta:
        torch.testing.assert_close(adapted[k], expected[k])
    assert any(not torch.equal(adapted[k], theta[k]) for k in theta)


def test_query_without_target_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", SINE, task="sinusoid", algorithm="reptile")
    support = write_csv(tmp_path / "s.csv", ["x", "y"], sine_rows(5, 0))
    query = write_csv(tmp_path / "q.csv", ["x"], sine_rows(4, 1, target=False))
    out = tmp_path / "out"
    run_ok(capsys, "--model", run, "--support", support, "--query", query, "--out", out, "--steps", "0", "--lr", "0.5")
    report = json.loads((out / "adapt.json").read_text())
    assert (report["steps"], report["lr"], report["algorithm"]) == (0, 0.5, "reptile")
    assert report["support_loss_post"] == report["support_loss_pre"]  # zero steps: theta itself
    assert "query_mse" not in report
    rows = read_predictions(out)
    assert len(rows) == 4 and list(rows[0]) == ["row", "prediction"]


def test_csv_classification_names_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", GAUSS, task="gaussian", ways=3)
    gen = np.random.default_rng(0)
    centres = {"beta": 2.0, "alpha": -2.0, "gamma": 0.0}
    rows = [[*(centres[c] + 0.3 * gen.standard_normal(4)), c] for c in centres for _ in range(4)]
    support = write_csv(tmp_path / "s.csv", ["a", "b", "c", "d", "label"], rows)
    query = write_csv(tmp_path / "q.csv", ["a", "b", "c", "d", "label"], rows[::2])
    out = tmp_path / "out"
    run_ok(capsys, "--model", run, "--support", support, "--query", query, "--out", out)
    report = json.loads((out / "adapt.json").read_text())
    assert report["support"]["classes"] == ["alpha", "beta", "gamma"]
    assert 0.0 <= report["query_accuracy"] <= 1.0
    assert report["support_loss_post"] < report["support_loss_pre"]
    predictions = read_predictions(out)
    assert len(predictions) == 6
    assert all(p["prediction"] in centres and 1 / 3 <= float(p["probability"]) <= 1 for p in predictions)
    meta = json.loads(load_file_metadata(out / "personalised.safetensors")["classes"])
    assert meta == ["alpha", "beta", "gamma"]


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_image_classification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", CONV, task="omniglot", ways=3)
    support = image_folder(tmp_path / "support", SHAPES, 2)
    labelled = image_folder(tmp_path / "query", SHAPES[:2], 1)  # a subset of the classes is fine
    flat = image_folder(tmp_path / "flat", SHAPES, 1, flat=True)

    out = tmp_path / "out"
    printed = run_ok(capsys, "--model", run, "--support", support, "--query", labelled, "--out", out)
    assert "3 classes" in printed and "query accuracy" in printed
    for name in ("personalised.safetensors", "predictions.csv", "adapt.json"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "adapt.json").read_text())
    assert report["support"]["classes"] == list(SHAPES) and report["transductive_bn"] is True
    assert 0.0 <= report["query_accuracy"] <= 1.0
    rows = read_predictions(out)
    assert [r["file"] for r in rows] == ["circle/0.png", "cross/0.png"]
    assert [r["target"] for r in rows] == ["circle", "cross"]
    assert all(r["prediction"] in SHAPES for r in rows)

    out2 = tmp_path / "out2"
    run_ok(capsys, "--model", run, "--support", support, "--query", flat, "--out", out2)
    rows = read_predictions(out2)
    assert [r["file"] for r in rows] == ["circle-0.png", "cross-0.png", "line-0.png"]
    assert "target" not in rows[0] and "query_accuracy" not in json.loads((out2 / "adapt.json").read_text())


def test_load_image_inverts_strokes(tmp_path: Path) -> None:
    img = Image.new("L", (40, 40), 255)
    ImageDraw.Draw(img).rectangle((0, 0, 19, 39), fill=0)  # left half black ink
    img.save(tmp_path / "a.png")
    pixels = load_image(tmp_path / "a.png", 10)
    assert pixels.shape == (10, 10) and pixels.dtype == np.uint8
    assert pixels[:, :4].min() >= 250 and pixels[:, 6:].max() <= 5  # strokes bright, paper dark
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent: counts as white paper
    rgba.save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png", 8).max() == 0


# ---------------------------------------------------------------------------- bad inputs

def _bad_cases(tmp: Path) -> dict[str, tuple[list[object], str]]:
    sine = export(tmp / "sine", SINE, task="sinusoid")
    conv = export(tmp / "conv", CONV, task="omniglot", ways=3)
    gauss = export(tmp / "gauss", GAUSS, task="gaussian", ways=3)
    good = write_csv(tmp / "good.csv", ["x", "y"], sine_rows(5, 0))
    images = image_folder(tmp / "images", SHAPES, 1)

    (tmp / "empty-model").mkdir()
    bad_algo, bad_task = tmp / "bad-algo" / "model", tmp / "bad-task" / "model"
    for folder, key, value in ((bad_algo, "algorithm", "magic"), (bad_task, "task", "weather")):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes((sine / "model" / "model.safetensors").read_bytes())
        meta = json.loads((sine / "model" / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps(meta | {key: value}))
    (tmp / "empty-support").mkdir()
    two = image_folder(tmp / "two", SHAPES[:2], 1)
    corrupt = image_folder(tmp / "corrupt", SHAPES, 1)
    (corrupt / "line" / "0.png").write_bytes(b"not a png at all")
    labels = [[1.0, 0.0, 0.0, 0.0, "a"], [0.0, 1.0, 0.0, 0.0, "b"]]

    def csv_file(name: str, header: list[str], rows: list[list[object]]) -> Path:
        return write_csv(tmp / name, header, rows)

    def args(model: Path, support: Path, query: Path = good) -> list[object]:
        return ["--model", model, "--support", support, "--query", query, "--out", tmp / "out"]

    return {
        "missing model files": (args(tmp / "empty-model", good), "model.json"),
        "unknown algorithm": (args(bad_algo, good), "unknown algorithm 'magic'"),
        "unknown task": (args(bad_task, good), "unknown task 'weather'"),
        "empty support csv": (args(sine, csv_file("header-only.csv", ["x", "y"], [])), "got none"),
        "empty support folder": (args(conv, tmp / "empty-support", images), "got images only"),
        "wrong number of classes (images)": (args(conv, two, two), "expected 3 classes"),
        "wrong number of classes (csv)": (args(gauss, csv_file("two.csv", list("abcdy"), labels)), "expected 3 classes"),
        "unreadable image": (args(conv, corrupt, images), "cannot read this image"),
        "too many columns": (args(sine, csv_file("wide.csv", ["x", "z", "y"], [[1, 2, 3]])), "columns"),
        "ragged row": (args(sine, csv_file("ragged.csv", ["x", "y"], [[1, 2], [1]])), "line 3"),
        "non-numeric value": (args(sine, csv_file("text.csv", ["x", "y"], [[1, "two"]])), "expected a number"),
        "NaN": (args(sine, csv_file("nan.csv", ["x", "y"], [[1, 2], ["nan", 1]])), "finite"),
        "no header": (args(sine, csv_file("noheader.csv", ["1.0", "2.0"], [[1, 2]])), "header"),
        "query columns": (args(sine, good, csv_file("q3.csv", ["x", "z", "y"], [[1, 2, 3]])), "expected 1 or 2 columns"),
        "unknown query class": (args(gauss, csv_file("s3.csv", list("abcdy"), [*labels, [0, 0, 1, 0, "c"]]),
                                     csv_file("q.csv", list("abcdy"), [[0, 0, 0, 1, "z"]])), "not classes"),
        "images for regression": (args(sine, images, images), "classification model"),
        "bad lr": (args(sine, good) + ["--lr", "-1"], "--lr"),
    }


CASES = [
    "missing model files", "unknown algorithm", "unknown task", "empty support csv", "empty support folder",
    "wrong number of classes (images)", "wrong number of classes (csv)", "unreadable image", "too many columns",
    "ragged row", "non-numeric value", "NaN", "no header", "query columns", "unknown query class",
    "images for regression", "bad lr",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = _bad_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmeta-adapt: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()  # nothing written on a refused input


def test_every_bad_case_is_run(tmp_path: Path) -> None:
    assert sorted(_bad_cases(tmp_path)) == sorted(CASES)


def export_meta(root: Path, spec: ModelSpec, *, task: str, algorithm: str, ways: int = 3) -> Path:
    """As `export`, with the algorithm's extra meta-parameters (Meta-SGD's step sizes) in the file."""
    from fedmeta.common.algorithms import meta_parameters

    run = RunConfig(run_id="unit", algorithm=algorithm, task=task, model=spec, ways=ways, dim=4, eval_steps=5,
                    inner_lr=0.02 if task == "sinusoid" else 0.3)
    RunDir(root).export_model(meta_parameters(run, 0), run, "v0")
    return root


def test_metasgd_export_adapts_with_its_learned_step_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export_meta(tmp_path / "run", SINE, task="sinusoid", algorithm="metasgd")
    support = write_csv(tmp_path / "s.csv", ["x", "y"], sine_rows(10, 1))
    query = write_csv(tmp_path / "q.csv", ["x", "y"], sine_rows(7, 2))
    out = tmp_path / "out"
    run_ok(capsys, "--model", run, "--support", support, "--query", query, "--out", out)
    report = json.loads((out / "adapt.json").read_text())
    assert report["support_loss_post"] < report["support_loss_pre"]
    assert len(read_predictions(out)) == 7


def test_protonet_export_predicts_by_prototypes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = ModelSpec("mlp", {"in_features": 4, "hidden": [16], "out_features": 8})
    run = export_meta(tmp_path / "run", encoder, task="gaussian", algorithm="protonet")
    gen = np.random.default_rng(0)
    centres = {"a": 6.0, "b": -6.0, "c": 0.0}  # far apart: nearest prototype is always right
    rows = [[*(centres[c] + 0.1 * gen.standard_normal(4)), c] for c in centres for _ in range(3)]
    support = write_csv(tmp_path / "s.csv", ["f1", "f2", "f3", "f4", "label"], rows)
    query = write_csv(tmp_path / "q.csv", ["f1", "f2", "f3", "f4", "label"], rows[1::2])
    out = tmp_path / "out"
    run_ok(capsys, "--model", run, "--support", support, "--query", query, "--out", out)
    report = json.loads((out / "adapt.json").read_text())
    assert report["query_accuracy"] == 1.0
    assert [p["prediction"] for p in read_predictions(out)] == [r[-1] for r in rows[1::2]]
