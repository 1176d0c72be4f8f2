"""Plots of a run directory (fedmeta-plot): meta-loss per round, the adaptation curve, sinusoid fits.

matplotlib is optional (`pip install -e '.[plots]'`): it is imported inside
make_plots only, and figures are drawn with the Agg canvas, never pyplot, so nothing
global (the backend, open figures) changes in the calling process.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmeta.common.cli import OneLineErrorParser, add_model_import_argument, model_imports

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install -e '.[plots]' (matplotlib)"
FITS_SEED = 20170318  # fixed: the same held-out sinusoids for every run, so plots compare
FITS_TASKS = 4
DPI = 130


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from exc
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's round records, one per round (the last record wins after a resume), by round."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: expected a run directory with metrics.jsonl, got none there")
    by_round: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from exc
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a record cut short by a kill mid-write
            raise ValueError(f"{path} line {i + 1}: expected one JSON record, got {line[:60]!r}") from None
        if isinstance(record, dict) and isinstance(record.get("round"), int) and "meta_loss" in record:
            by_round[record["round"]] = record
    if not by_round:
        raise ValueError(f"{path}: expected round records, got none")
    return [by_round[r] for r in sorted(by_round)]


def read_validation(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's validation records (--eval-every), by rounds trained; empty without validation."""
    path = run_dir / "metrics.jsonl"
    by_rounds: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(record, dict) and record.get("event") == "validation"
                and isinstance(record.get("rounds_trained"), int) and isinstance(record.get("val_value"), (int, float))):
            by_rounds[record["rounds_trained"]] = record
    return [by_rounds[r] for r in sorted(by_rounds)]


def plot_validation(records: list[dict[str, Any]], summary: dict[str, Any] | None, title: str, path: Path) -> Path:
    """Validation accuracy (or MSE) against rounds, with 95% CIs and the best round marked."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    rounds = [r["rounds_trained"] for r in records]
    values = [float(r["val_value"]) for r in records]
    cis = [float(r["val_ci95"]) if isinstance(r.get("val_ci95"), (int, float)) else 0.0 for r in records]
    metric = str(records[0].get("val_metric", "metric"))
    ax.errorbar(rounds, values, yerr=cis, color="tab:green", marker="o", markersize=3, capsize=2, linewidth=1.5,
                label=f"validation {metric} after adaptation (95% CI)")
    best = (summary or {}).get("best")
    if isinstance(best, dict) and isinstance(best.get("rounds_trained"), int) and isinstance(best.get("value"), (int, float)):
        ax.plot([best["rounds_trained"]], [best["value"]], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"best: round {best['rounds_trained']} (model-best/)")
    if len(rounds) <= 15:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rounds trained")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{title}\nvalidation during training (held-out validation tasks)", fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    fig.savefig(path)
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` rounds (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_meta_loss(records: list[dict[str, Any]], title: str, task: str, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    rounds = [r["round"] + 1 for r in records]
    window = max(1, len(records) // 25)
    unit = "MSE" if task == "sinusoid" else "cross-entropy" if task in ("gaussian", "omniglot") else "loss"
    series = [("meta_loss", "after inner-loop adaptation (the meta-loss)", "tab:blue"),
              ("loss_pre", "before adaptation (θ itself)", "tab:orange")]
    for key, label, color in series:
        values = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if len(values) != len(records):
            continue
        if window > 1:
            ax.plot(rounds, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(rounds, _smooth(values, window), color=color, linewidth=1.8, label=label,
                marker="o" if len(rounds) <= 30 else None, markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"clients' query loss ({unit})")
    note = f" (thin: each round, thick: mean of the last {window})" if window > 1 else ""
    ax.set_title(f"{title}\nmeta-training: query loss per round{note}", fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    ax.set_xlim(rounds[0], max(rounds[-1], rounds[0] + 1))
    fig.savefig(path)
    return path


def plot_adaptation_curve(summary: dict[str, Any], title: str, path: Path) -> Path:
    ev = summary["eval"]
    curve = [float(v) for v in ev["curve"]]
    accuracy = ev.get("curve_metric") == "accuracy"
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    steps = list(range(len(curve)))
    clients = ev.get("per_client") or {}
    for i, (client, stats) in enumerate(sorted(clients.items())):
        if isinstance(stats, dict) and len(stats.get("curve") or []) == len(curve):
            ax.plot(steps, stats["curve"], color="0.35", linewidth=0.8, alpha=0.8, zorder=3,
                    label=f"each client ({len(clients)})" if i == 0 else None)
    ax.plot(steps, curve, color="tab:blue", linewidth=2.2, marker="o", markersize=4,
            label=f"all {ev.get('tasks', '?')} held-out tasks")
    for step, key in ((steps[-1], "ci95"), (0, "ci95_pre")):
        ci = ev.get(key)
        if isinstance(ci, (int, float)) and math.isfinite(ci):
            ax.errorbar([step], [curve[step]], yerr=[ci], color="tab:blue", capsize=5, linewidth=1.5,
                        label="95% CI" if key == "ci95" else None)
    if accuracy and ev.get("ways"):
        ax.axhline(1.0 / ev["ways"], color="tab:red", linestyle=":", linewidth=1, label=f"chance (1/{ev['ways']})")
    setting = f"{ev['ways']}-way {ev['shots']}-shot" if ev.get("ways") else f"{ev.get('shots', '?')}-shot"
    ax.set_title(f"{title}\nfew-shot adaptation on held-out tasks ({setting}, {ev.get('queries', '?')} queries"
                 f"{' per class' if ev.get('ways') else ''})", fontsize=11)
    ax.set_xlabel("adaptation steps on the support set")
    unit = "accuracy" if accuracy else ("loss (MSE)" if summary.get("task") == "sinusoid" else "loss")
    ax.set_ylabel(f"query {unit}")
    ax.set_xticks(steps if len(steps) <= 21 else steps[:: max(1, len(steps) // 10)])
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right" if accuracy else "upper right")
    fig.savefig(path)
    return path


def plot_sinusoid_fits(model_dir: Path, title: str, path: Path, *, allowed_imports: Collection[str] = ()) -> Path:
    """Held-out sinusoids: the true curve, the K support points, the model before and after adaptation.

    model.json names a zoo model, or an import path only if `allowed_imports` (the local
    operator's --allow-model-import) names it: a file in a run directory chooses no code.
    """
    from safetensors.torch import load_file
    from fedmeta.common.algorithms.inner import forward

    from fedmeta.common.algorithms import get_algorithm
    from fedmeta.common.models import ModelSpec, build_model
    from fedmeta.common.tasks import loss_for
    from fedmeta.common.tasks.sinusoid import AMPLITUDE, PHASE, X_RANGE, SinusoidTasks

    meta = _read_json(model_dir / "model.json")
    if meta is None:
        raise ValueError(f"{model_dir}: expected model.json, got none")
    adapt = meta.get("adapt") or {}
    steps, lr, shots = int(adapt.get("steps", 10)), float(adapt.get("lr", 0.01)), int(adapt.get("shots", 5))
    try:
        spec = ModelSpec(str(meta["model"]["name"]), dict(meta["model"].get("kwargs", {})))
        model = build_model(spec, allowed_imports=allowed_imports)
    except ValueError as exc:
        raise ValueError(f"{model_dir / 'model.json'}: {exc}") from None
    theta = load_file(str(model_dir / "model.safetensors"))
    algorithm, loss_fn = get_algorithm(meta["algorithm"]), loss_for("sinusoid")
    gen = torch.Generator().manual_seed(FITS_SEED)
    grid = torch.linspace(*X_RANGE, 200).unsqueeze(-1)
    fig = _figure(10, 6.5)
    axes = fig.subplots(2, 2, sharex=True, sharey=True).flatten()
    for k, ax in enumerate(axes[:FITS_TASKS]):
        amp = float(torch.empty(()).uniform_(*AMPLITUDE, generator=gen))
        phase = float(torch.empty(()).uniform_(*PHASE, generator=gen))
        xs = torch.empty(shots, 1).uniform_(*X_RANGE, generator=gen)
        ys = SinusoidTasks.curve(amp, phase, xs)
        adapted = algorithm.adapt(model, theta, xs, ys, loss_fn, steps=steps, lr=lr)
        truth = SinusoidTasks.curve(amp, phase, grid)
        with torch.no_grad():
            before, after = forward(model, theta, grid), forward(model, adapted, grid)  # without "meta.*" extras
        mse_pre, mse_post = float(loss_fn(before, truth)), float(loss_fn(after, truth))
        ax.plot(grid[:, 0], truth[:, 0], color="black", linewidth=1.5, label="true function")
        ax.plot(grid[:, 0], before[:, 0], color="tab:orange", linestyle="--", linewidth=1.4,
                label="model before adaptation (θ)")
        ax.plot(grid[:, 0], after[:, 0], color="tab:blue", linewidth=1.8, label=f"after {steps} adaptation steps")
        ax.scatter(xs[:, 0], ys[:, 0], color="tab:red", zorder=5, s=30, label=f"the {shots} support points")
        ax.set_title(f"A = {amp:.2f}, φ = {phase:.2f}:  MSE {mse_pre:.2f} before, {mse_post:.2f} after", fontsize=10)
        ax.grid(True, alpha=0.3)
        if k >= 2:
            ax.set_xlabel("x")
        if k % 2 == 0:
            ax.set_ylabel("y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(f"{title}\nheld-out sinusoids: {shots}-shot adaptation, {steps} SGD steps at lr {lr:g}", fontsize=11)
    fig.savefig(path)
    return path


def _check_model_json(model_dir: Path, allowed_imports: Collection[str]) -> None:
    """Refuse a model.json whose model this process would not build (an import path nobody allowed here)."""
    from fedmeta.common.models import ModelSpec, check_model_spec

    meta = _read_json(model_dir / "model.json")
    if meta is None:
        return
    try:
        spec = ModelSpec(str(meta["model"]["name"]), dict(meta["model"].get("kwargs", {})))
        check_model_spec(spec, allowed_imports=allowed_imports)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{model_dir / 'model.json'}: {exc}") from None


def make_plots(run_dir: Path, *, allowed_imports: Collection[str] = ()) -> list[Path]:
    """Write run_dir/plots/*.png from metrics.jsonl, summary.json and model/; return their paths.

    Raises ImportError when matplotlib is missing and ValueError when the run has no metrics.
    """
    import matplotlib  # noqa: F401  (fails early, with the install hint from the caller)

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json") or {}
    info = summary or config
    task, algorithm = str(info.get("task", "?")), str(info.get("algorithm", "?"))
    run_id = str((summary or {}).get("run_id") or run_dir.name)
    title = f"{run_id}: {algorithm} on {task}"
    model_dir = run_dir / "model"
    _check_model_json(model_dir, allowed_imports)  # before anything is drawn
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    paths = [plot_meta_loss(records, title, task, out / "meta_loss.png")]
    validation = read_validation(run_dir)
    if validation:
        paths.append(plot_validation(validation, summary, title, out / "validation.png"))
    if summary is not None and isinstance(summary.get("eval"), dict) and summary["eval"].get("curve"):
        paths.append(plot_adaptation_curve(summary, title, out / "adaptation_curve.png"))
    if task == "sinusoid" and (model_dir / "model.json").is_file() and (model_dir / "model.safetensors").is_file():
        paths.append(plot_sinusoid_fits(model_dir, title, out / "sinusoid_fits.png", allowed_imports=allowed_imports))
    return paths


def plots_after_run(run_dir: Path) -> list[Path]:
    """What fedmeta-server does once a run finished: draw the plots if matplotlib is installed, else say how.

    A plot that fails is logged, not raised: the run itself has finished and been saved.
    """
    import importlib.util
    import logging

    log = logging.getLogger("fedmeta.server")
    if importlib.util.find_spec("matplotlib") is None:
        log.info("no plots: %s adds them (or run fedmeta-plot %s later)", INSTALL_HINT, run_dir)
        return []
    try:
        paths = make_plots(run_dir)
    except Exception as exc:  # noqa: BLE001  (the run is done; a plotting problem must not fail it)
        log.warning("plots not drawn (%s); fedmeta-plot %s retries", exc, run_dir)
        return []
    print(f"Plots: {', '.join(str(p) for p in paths)}", flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="fedmeta-plot",
                                description="Draw a run directory's plots into RUN_DIR/plots/ (needs matplotlib: "
                                            f"{INSTALL_HINT}).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by fedmeta-server")
    add_model_import_argument(parser)
    args = parser.parse_args(argv)
    try:
        paths = make_plots(args.run_dir, allowed_imports=model_imports(args))
    except ImportError as exc:
        parser.error(f"plots need matplotlib ({exc}); {INSTALL_HINT} installs it")
    except (ValueError, KeyError, TypeError) as exc:
        parser.error(str(exc) if isinstance(exc, ValueError) else f"{args.run_dir}: malformed run files ({exc!r})")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
