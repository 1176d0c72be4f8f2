"""Code is chosen only locally: model specs from a coordinator or a model.json are zoo models with
bounded arguments; an import path is built only where the local operator allows exactly it.

fedmeta-adapt and fedmeta-plot are run through their main(argv) on crafted exports whose
model.json names `subprocess:run` with shell arguments: each refuses with one line, exits
non-zero and runs nothing.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import pytest

from fedmeta.client.adapt import main as adapt_main
from fedmeta.common.config import RunConfig
from fedmeta.common.models import MAX_PARAMETERS, ModelSpec, build_model, check_import_paths, check_model_spec, init_parameters
from fedmeta.server.plots import main as plot_main
from fedmeta.server.rundir import RunDir

LINEAR = ModelSpec("torch.nn:Linear", {"in_features": 1, "out_features": 1})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("mlp", {"hidden": [65536] * 3}), "parameters; at most"),
        (ModelSpec("mlp", {"hidden": [0]}), "hidden: expected an integer from 1"),
        (ModelSpec("mlp", {"hidden": [True]}), "hidden: expected an integer"),
        (ModelSpec("mlp", {"hidden": "40"}), "hidden: expected a list"),
        (ModelSpec("mlp", {"hidden": [1] * 65}), "at most 64 layer widths"),
        (ModelSpec("mlp", {"in_features": 2.5}), "in_features: expected an integer"),
        (ModelSpec("mlp", {"out_features": -1}), "out_features: expected an integer"),
        (ModelSpec("conv4", {"image_size": 1 << 20}), "image_size: expected an integer from 16 to 1024"),
        (ModelSpec("conv4", {"ways": 100_000, "hidden": 4096, "image_size": 1024}), "parameters; at most"),
        (ModelSpec("conv4", {"activation": "relu"}), r"unknown arguments \['activation'\]"),
        (ModelSpec("mlp", ["not", "a", "dict"]), "expected keyword arguments as a JSON object"),  # type: ignore[arg-type]
        (ModelSpec("Mlp"), "unknown model 'Mlp'"),
        (ModelSpec("subprocess:run", {"args": "true", "shell": True}), "allows none by that name"),
        (ModelSpec("torch.nn:Linear"), "allows none by that name"),
    ],
)
def test_model_specs_are_checked_before_anything_is_built(spec: ModelSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_model_spec(spec, allowed_imports={"os.path:join"})
    with pytest.raises(ValueError, match=message):
        init_parameters(spec, 0)


def test_zoo_defaults_and_the_largest_defaults_pass() -> None:
    for spec in (ModelSpec("mlp"), ModelSpec("conv4"), ModelSpec("mlp", {"in_features": 784, "hidden": [256, 128, 64],
                                                                         "out_features": 5})):
        check_model_spec(spec)
    assert MAX_PARAMETERS == 1 << 29


def test_allowed_import_path_is_built_exactly_when_named() -> None:
    model = build_model(LINEAR, allowed_imports=check_import_paths(["torch.nn:Linear"]))
    assert model.weight.shape == (1, 1)
    with pytest.raises(ValueError, match="allows none by that name"):
        build_model(LINEAR, allowed_imports={"torch.nn:Linear2", "torch.nn"})
    for bad in ("os.system", "torch.nn:Linear()", ":Linear", "torch nn:Linear"):
        with pytest.raises(ValueError, match="--allow-model-import: expected package.module:Class"):
            check_import_paths([bad])


# ---- fedmeta-adapt and fedmeta-plot on a crafted model.json ---------------------------------------------


def _export(root: Path, spec: ModelSpec, *, allowed: set[str] | None = None) -> Path:
    run = RunConfig(run_id="unit", algorithm="maml", task="sinusoid", model=spec, eval_steps=2, inner_lr=0.02)
    rd = RunDir(root)
    rd.create({"algorithm": "maml", "task": "sinusoid"})
    for r in range(3):
        rd.append_metrics({"round": r, "meta_loss": 1.0 / (1 + r), "loss_pre": 2.0, "clients_answered": 1})
    rd.export_model(init_parameters(spec, 0, allowed_imports=allowed or ()), run, "v0")
    return root


def _craft(root: Path, marker: Path) -> Path:
    """An export whose model.json was edited to name subprocess:run with a shell command."""
    _export(root, ModelSpec("mlp", {"in_features": 1, "hidden": [8], "out_features": 1}))
    path = root / "model" / "model.json"
    meta = json.loads(path.read_text())
    meta["model"] = {"name": "subprocess:run", "kwargs": {"args": f"touch {marker}", "shell": True}}
    path.write_text(json.dumps(meta))
    return root


def _csv(path: Path, n: int) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["x", "y"], *[[i / n, 0.5 * i / n] for i in range(n)]])
    return path


def _refused(capsys: pytest.CaptureFixture[str], main, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_adapt_refuses_a_model_json_that_names_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    run = _craft(tmp_path / "run", marker)
    argv = ["--model", str(run), "--support", str(_csv(tmp_path / "s.csv", 5)),
            "--query", str(_csv(tmp_path / "q.csv", 3)), "--out", str(tmp_path / "out")]
    err = _refused(capsys, adapt_main, argv)
    assert err.startswith("fedmeta-adapt: error: ") and "model 'subprocess:run'" in err and "model.json" in err
    err = _refused(capsys, adapt_main, [*argv, "--allow-model-import", "torch.nn:Linear"])
    assert "model 'subprocess:run'" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_adapt_runs_an_import_path_its_operator_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _export(tmp_path / "run", LINEAR, allowed={"torch.nn:Linear"})
    argv = ["--model", str(run), "--support", str(_csv(tmp_path / "s.csv", 5)),
            "--query", str(_csv(tmp_path / "q.csv", 3)), "--out", str(tmp_path / "out")]
    err = _refused(capsys, adapt_main, argv)
    assert "--allow-model-import torch.nn:Linear" in err
    assert adapt_main([*argv, "--allow-model-import", "torch.nn:Linear"]) == 0
    report = json.loads((tmp_path / "out" / "adapt.json").read_text())
    assert report["query"]["examples"] == 3 and report["steps"] == 2


def test_plot_refuses_a_model_json_that_names_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    run = _craft(tmp_path / "run", marker)
    err = _refused(capsys, plot_main, [str(run)])
    assert err.startswith("fedmeta-plot: error: ") and "model 'subprocess:run'" in err
    assert not marker.exists() and not (run / "plots").exists()


def test_plot_draws_an_import_path_model_its_operator_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    run = _export(tmp_path / "run", LINEAR, allowed={"torch.nn:Linear"})
    assert "allows none by that name" in _refused(capsys, plot_main, [str(run)])
    assert plot_main([str(run), "--allow-model-import", "torch.nn:Linear"]) == 0
    assert (run / "plots" / "sinusoid_fits.png").is_file()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"task": "gaussian", "dim": 100_000, "tasks_per_client": 1000, "shots": 100}, "--tasks-per-client x --shots"),
        ({"eval_tasks_per_client": 10**9}, "--eval-tasks-per-client x --eval-shots"),
        ({"task": "omniglot", "ways": 1000, "shots": 1000, "queries": 1000}, "over 1,073,741,824"),
        ({"inner_steps": 10**9}, "--inner-steps: expected at most 10000"),
        ({"eval_steps": 10_001}, "--eval-steps: expected at most 10000"),
        ({"local_steps": 10**6}, "--local-steps: expected at most 10000"),
    ],
)
def test_run_configuration_cannot_ask_a_client_for_unbounded_work(settings: dict[str, object], message: str) -> None:
    """A RunConfig comes over the wire in Join: its sizes bound what a client allocates and computes."""
    with pytest.raises(ValueError, match=message):
        RunConfig(run_id="unit", **settings)  # type: ignore[arg-type]
    RunConfig(run_id="unit", task="omniglot", ways=20, shots=5, queries=15, eval_tasks_per_client=600)
