"""server/plots.py on synthetic run directories; fedmeta-plot's errors; the coordinator's plot hook."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.models import ModelSpec, init_parameters
from fedmeta.server import plots
from fedmeta.server.plots import main, make_plots, read_metrics
from fedmeta.server.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SINE = ModelSpec("mlp", {"in_features": 1, "hidden": [8, 8], "out_features": 1})


def fake_run(root: Path, *, task: str, rounds: int = 60, clients: int = 3) -> Path:
    """metrics.jsonl, summary.json and model/ as fedmeta-server writes them, with made-up numbers."""
    rd = RunDir(root)
    rd.create({"algorithm": "fomaml", "task": task})
    for r in range(rounds):
        rd.append_metrics({"round": r, "meta_loss": 2.0 / (1 + r) + 0.1 * (r % 3), "loss_pre": 3.0 - r / rounds,
                           "clients_answered": clients})
    classification = task != "sinusoid"
    curve = [0.2 + 0.5 * (1 - 0.6**k) for k in range(6)] if classification else [3.0 * 0.7**k for k in range(6)]
    per_client = {f"c{i}": {"tasks": 10, "curve": [v * (1 + 0.05 * (i - 1)) for v in curve]} for i in range(clients)}
    ev = {"shots": 5, "steps": 5, "queries": 10, "tasks": 30, "curve_metric": "accuracy" if classification else "loss",
          "curve": curve, "ci95": 0.03, "ci95_pre": 0.02, "per_client": per_client, "loss_pre": 1.0, "loss_post": 0.5}
    if classification:
        ev["ways"] = 5
    rd.write_summary({"run_id": "unit-run", "algorithm": "fomaml", "task": task, "eval": ev})
    spec = SINE if task == "sinusoid" else ModelSpec("mlp", {"in_features": 4, "hidden": [8], "out_features": 5})
    run = RunConfig(run_id="unit-run", algorithm="fomaml", task=task, model=spec, eval_steps=3, dim=4)
    rd.export_model(init_parameters(spec, 0), run, "v0")
    return root


@pytest.mark.parametrize("task, expected", [
    ("sinusoid", ["meta_loss.png", "adaptation_curve.png", "sinusoid_fits.png"]),
    ("gaussian", ["meta_loss.png", "adaptation_curve.png"]),
])
def test_make_plots_writes_pngs(tmp_path: Path, task: str, expected: list[str]) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", task=task)
    paths = make_plots(run)
    assert [p.name for p in paths] == expected
    for p in paths:
        assert p.parent == run / "plots"
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p


def test_unfinished_run_gets_the_meta_loss_plot_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rd = RunDir(tmp_path / "run")
    rd.create({"algorithm": "maml", "task": "sinusoid"})
    for r in range(3):
        rd.append_metrics({"round": r, "meta_loss": 1.0, "loss_pre": 2.0})
    assert [p.name for p in make_plots(rd.path)] == ["meta_loss.png"]


def test_read_metrics_keeps_the_last_record_of_a_round_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"round": 0, "meta_loss": 1.0}\n{"round": 1, "meta_loss": 2.0}\n{"round": 1, "meta_loss": 3.0}\n{"round": 2, "me'
    )
    assert [r["meta_loss"] for r in read_metrics(tmp_path)] == [1.0, 3.0]


def test_fedmeta_plot_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", task="gaussian", rounds=5)
    assert main([str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "plots" / "meta_loss.png"), str(run / "plots" / "adaptation_curve.png")]


def test_fedmeta_plot_without_metrics_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmeta-plot: error: ") and "metrics.jsonl" in err and err.count("\n") == 1


def test_fedmeta_plot_without_matplotlib_says_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    with pytest.raises(SystemExit) as exc:
        main([str(fake_run(tmp_path / "run", task="sinusoid", rounds=2))])
    assert exc.value.code == 2
    assert "pip install -e '.[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "plots").exists()


def test_coordinator_hook_without_matplotlib_logs_the_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with caplog.at_level(logging.INFO, logger="fedmeta.server"):
        assert plots.plots_after_run(fake_run(tmp_path / "run", task="sinusoid", rounds=2)) == []
    assert "pip install -e '.[plots]'" in caplog.text


def test_coordinator_hook_logs_a_failed_plot_instead_of_raising(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="fedmeta.server"):
        assert plots.plots_after_run(tmp_path / "run") == []
    assert "plots not drawn" in caplog.text and "metrics.jsonl" in caplog.text


def test_server_plots_imports_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any module-level "import matplotlib" would raise
    importlib.reload(plots)
    assert callable(plots.make_plots)
