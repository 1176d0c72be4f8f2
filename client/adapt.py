"""fedmeta-adapt: personalise an exported meta-learned model on a new data holder's own few examples.

theta' = adapt(theta; support) with the run's algorithm (k SGD steps, lr from model.json
unless given), then theta' predicts the query set. Inputs are a folder of class
sub-folders of images (grayscale, inverted: dark strokes on light paper become 1.0 on
0.0, see common/images.py) or a CSV with a header (inputs, then the target column).
With --fine-tune-steps, Adam then fine-tunes theta' on the support set less a held-out slice,
early-stopped on that slice (client/finetune.py); both results are reported.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedmeta.common.algorithms import Algorithm, configured, get_algorithm
from fedmeta.common.algorithms.inner import EXTRA, forward
from fedmeta.common.clusters import split
from fedmeta.common.cli import OneLineErrorParser, add_model_import_argument, model_imports
from fedmeta.common.models import ModelSpec, build_model, check_model_spec, uses_batch_statistics
from fedmeta.common.tasks import is_classification, loss_for
from fedmeta.client import finetune
from fedmeta.client.adapt_inputs import Examples, Exported, Params, read_csv, read_examples  # noqa: F401 (re-exported)
from fedmeta.client.finetune import FineTune


def find_model(path: Path) -> Path:
    """The folder holding model.json and model.safetensors: `path` itself, `path/model`, or a file's folder."""
    if path.is_file() and path.name in ("model.json", "model.safetensors"):
        path = path.parent
    for folder in (path, path / "model"):
        if (folder / "model.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    missing = [n for n in ("model.json", "model.safetensors") if not (path / "model" / n).exists()
               and not (path / n).exists()]
    raise ValueError(f"--model {path}: expected a folder with model.json and model.safetensors (RUN_DIR/model) "
                     f"or a run directory holding one; missing {', '.join(missing) or 'a matching pair'}")


def load_exported(path: Path, *, allowed_imports: Collection[str] = ()) -> Exported:
    """Read an export; its model must be a zoo model, or an import path in `allowed_imports`."""
    folder = find_model(path)
    try:
        meta = json.loads((folder / "model.json").read_text())
        spec = ModelSpec(str(meta["model"]["name"]), dict(meta["model"].get("kwargs", {})))
        if spec.name == "conv4" and "norm" not in spec.kwargs:  # exported before Conv4 had a choice: batch norm
            spec = ModelSpec(spec.name, spec.kwargs | {"norm": "batch"})
        algorithm, task = str(meta["algorithm"]), str(meta["task"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as exc:
        raise ValueError(f"{folder / 'model.json'}: expected the JSON fedmeta-server exports "
                         f"(model.name, algorithm, task), got an unreadable file ({exc!r})") from exc
    try:
        check_model_spec(spec, allowed_imports=allowed_imports)
    except ValueError as exc:
        raise ValueError(f"{folder / 'model.json'}: {exc}") from None
    get_algorithm(algorithm)
    loss_for(task)
    try:
        params = load_file(str(folder / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{folder / 'model.safetensors'}: cannot read it ({exc})") from exc
    adapt = meta.get("adapt") if isinstance(meta.get("adapt"), dict) else {}
    clusters = meta.get("clusters", 1)
    if not isinstance(clusters, int) or isinstance(clusters, bool) or not 1 <= clusters <= 64:
        raise ValueError(f"{folder / 'model.json'}: clusters: expected an integer in [1, 64], got {clusters!r}")
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    return Exported(folder, spec, algorithm, task, params, adapt, str(meta.get("parameter_version", "")),
                    frozenset(allowed_imports), clusters, run)


def check_parameters(model: nn.Module, params: Params, where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    # The algorithm's own meta-parameters ("meta.*": Meta-SGD's step sizes) travel with the model's.
    got = {k: tuple(v.shape) for k, v in params.items() if not k.startswith(EXTRA)}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"{where}: its tensors do not fit the model in model.json (missing {missing}, "
                         f"unexpected {extra}, other shapes {shapes})")


# ---------------------------------------------------------------------------- reading examples

# ---------------------------------------------------------------------------- adaptation

def _forward(model: nn.Module, params: Params, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    try:
        with torch.no_grad():
            # The model's own parameters ("meta.*" extras are the algorithm's); `context`: the support set,
            # whose statistics a support-norm model normalises the queries with.
            return forward(model, params, x, context)
    except RuntimeError as exc:
        raise ValueError(f"the model cannot take inputs of shape {list(x.shape[1:])}: {exc}") from exc


def _query_metric(pred: torch.Tensor, y: torch.Tensor, classification: bool) -> float:
    if classification:
        return float((pred.argmax(-1) == y).float().mean())
    return float(torch.nn.functional.mse_loss(pred, y))


def prepare(exported: Exported, support: Examples, device: torch.device) -> tuple[nn.Module, Params]:
    """The model and theta on `device`, checked against the support set: its classes are the model's outputs."""
    model = build_model(exported.spec, allowed_imports=exported.allowed_imports).to(device)
    check_parameters(model, exported.params, exported.folder / "model.safetensors")
    theta = {k: v.to(device=device, dtype=torch.float32) for k, v in exported.params.items()}
    outputs = _forward(model, theta, support.x.to(device)).shape[-1]
    algorithm = algorithm_of(exported)
    prototypes = algorithm.predict is not None  # ProtoNets, Matching and Relation Nets: any number of classes
    _check_rule(algorithm, model, theta, support, exported.folder / "model.safetensors")
    if is_classification(exported.task) and not prototypes and len(support.classes) != outputs:
        raise ValueError(f"--support: expected {outputs} classes, as the model has {outputs} outputs; got "
                         f"{len(support.classes)} ({', '.join(support.classes[:10])})")
    if not is_classification(exported.task) and outputs != 1:
        raise ValueError(f"the model has {outputs} outputs; a CSV with one target column needs 1")
    return model, theta


def algorithm_of(exported: Exported) -> Algorithm:
    """The run's algorithm with the settings of its prediction rule from model.json's "run"."""
    try:
        return configured(get_algorithm(exported.algorithm), exported.run)
    except ValueError as exc:
        raise ValueError(f"{exported.folder / 'model.json'}: run: {exc}") from None


def _check_rule(algorithm: Algorithm, model: nn.Module, theta: Params, support: Examples, where: Path) -> None:
    """Refuse an export that lacks the tensors its prediction rule needs (Relation Nets' relation module)."""
    if algorithm.predict is None or support.y is None:
        return
    device = next(iter(theta.values())).device
    x, y = support.x.to(device), support.y.to(device)
    try:
        with torch.no_grad():
            algorithm.predict(model, theta, x, y, x[:1])
    except KeyError as exc:
        raise ValueError(f"{where}: it lacks the tensor {exc} that {algorithm.name} predicts with") from None
    except RuntimeError as exc:
        raise ValueError(f"{where}: its {algorithm.name} tensors do not fit the model ({exc})") from None


@dataclass(frozen=True)
class Result:
    """theta' (personalised.safetensors), the adapt.json report, and predictions.csv as a header and rows."""

    adapted: Params
    report: dict[str, Any]
    header: list[str]
    rows: list[list[str]]


def personalise(exported: Exported, model: nn.Module, theta: Params, support: Examples, query: Examples, *,
                steps: int, lr: float, fine_tune: FineTune | None = None) -> Result:
    """Adapt theta on the support set with the run's algorithm, then predict (and score) the query set.

    With `fine_tune`, a held-out slice of the support set is set aside first: the algorithm adapts
    on the rest, Adam fine-tunes from there, and the slice picks the parameters (finetune.py).
    """
    if support.y is None:
        raise ValueError("--support: expected labelled examples, got no targets")
    classification = is_classification(exported.task)
    device = next(iter(theta.values())).device
    fit, held = support, None
    if fine_tune is not None:
        fit, held = finetune.split_support(support, fine_tune.holdout, classification=classification)
    xs, ys, xq = fit.x.to(device), fit.y.to(device), query.x.to(device)  # type: ignore[union-attr]
    loss_fn = loss_for(exported.task)
    algorithm = algorithm_of(exported)
    adapted = algorithm.adapt(model, theta, xs, ys, loss_fn, steps=steps, lr=lr)
    adapted = few_shot = {k: v.detach() for k, v in adapted.items()}
    tuned: dict[str, Any] | None = None
    if fine_tune is not None and held is not None:
        rule = finetune.prediction_rule(algorithm, model, fit, device)
        adapted, tuned = finetune.fine_tune(rule, loss_fn, few_shot, fit, held, fine_tune,
                                            classification=classification)

    def predict(params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits or values; ProtoNets' come from distances to the support set's prototypes."""
        if algorithm.predict is not None:
            with torch.no_grad():
                return algorithm.predict(model, params, xs, ys, x)
        return _forward(model, params, x, xs)

    report: dict[str, Any] = {
        "model": str(exported.folder), "algorithm": exported.algorithm, "task": exported.task,
        "parameter_version": exported.version, "steps": steps, "lr": lr,
        "support": {"examples": len(support.names), "classes": list(support.classes) or None},
        "support_loss_pre": float(loss_fn(predict(theta, xs), ys)),
        "support_loss_post": float(loss_fn(predict(few_shot, xs), ys)),  # after the algorithm's own steps
        "query": {"examples": len(query.names), "labelled": query.y is not None},
        "transductive_bn": uses_batch_statistics(model),
    }
    if tuned is not None:
        report["fine_tune"] = tuned | {"fit_loss": float(loss_fn(predict(adapted, xs), ys))}
        report["support"]["fit_examples"] = len(fit.names)  # support_loss_*: on these
    # One forward pass over the whole query set. Only a transductive model (--norm batch) normalises it
    # together, as in its evaluation; every other model predicts each query alone, the same in any batch.
    pred = predict(adapted, xq).cpu()
    if query.y is not None:
        metric = "query_accuracy" if classification else "query_mse"
        report[f"{metric}_pre"] = _query_metric(predict(theta, xq).cpu(), query.y, classification)
        report[metric] = _query_metric(pred, query.y, classification)
        if tuned is not None:  # after the meta-learned steps only, before fine-tuning
            report[f"{metric}_adapted"] = _query_metric(predict(few_shot, xq).cpu(), query.y, classification)
    header = ["file" if query.x.dim() > 2 else "row", "prediction"] + (["probability"] if classification else [])
    header += ["target"] if query.y is not None else []
    rows: list[list[str]] = []
    for i, name in enumerate(query.names):
        if classification:
            prob = torch.softmax(pred[i], -1)
            k = int(prob.argmax())
            row = [name, support.classes[k], f"{float(prob[k]):.4f}"]
        else:
            row = [name, f"{float(pred[i, 0]):.7g}"]
        if query.y is not None:
            row.append(support.classes[int(query.y[i])] if classification else f"{float(query.y[i, 0]):.7g}")
        rows.append(row)
    return Result(adapted, report, header, rows)


def choose_cluster(exported: Exported, support: Examples, query: Examples, device: torch.device, *, steps: int,
                   lr: float, fine_tune: FineTune | None = None) -> Result:
    """A model exported with --clusters K: personalise each cluster's θ, keep the one whose support loss after
    adaptation is lowest (IFCA, Ghosh et al. 2020: a new client joins the cluster that fits its data best)."""
    results = []
    for theta in split(exported.params, exported.clusters):
        one = dataclasses.replace(exported, params=theta, clusters=1)
        model, prepared = prepare(one, support, device)
        results.append(personalise(one, model, prepared, support, query, steps=steps, lr=lr, fine_tune=fine_tune))
    losses = [r.report["support_loss_post"] for r in results]
    best = min(range(len(losses)), key=lambda j: losses[j] if math.isfinite(losses[j]) else math.inf)
    results[best].report["cluster"] = {"index": best, "of": exported.clusters, "support_loss_post": losses}
    return results[best]


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    support, classes = report["support"], report["support"]["classes"]
    of_classes = f" of {len(classes)} classes" if classes else ""
    fit = f"{support['fit_examples']} of " if "fit_examples" in support else ""  # the rest held out to fine-tune
    head = (f"fedmeta-adapt: {report['algorithm']} model for {report['task']}, {report['steps']} steps at lr "
            f"{report['lr']:g} on {fit}{support['examples']} support examples{of_classes}")
    lines = [head, f"  support loss      {report['support_loss_pre']:.4f} -> {report['support_loss_post']:.4f}"]
    lines += finetune.summary_lines(report)
    if "cluster" in report:
        c = report["cluster"]
        losses = ", ".join(f"{v:.4f}" for v in c["support_loss_post"])
        lines.append(f"  cluster           {c['index']} of {c['of']}: its θ adapts best on the support set "
                     f"(support loss after adaptation per cluster: {losses})")
    for metric, name in (("query_accuracy", "query accuracy"), ("query_mse", "query MSE")):
        if metric in report:
            middle = f"{report[metric + '_adapted']:.4f} (meta-learned steps) -> " if metric + "_adapted" in report else ""
            lines.append(f"  {name:<17} {report[metric + '_pre']:.4f} -> {middle}{report[metric]:.4f}"
                         f"  ({report['query']['examples']} labelled query examples)")
    lines.append(f"Wrote {out / 'personalised.safetensors'}, {out / 'predictions.csv'} "
                 f"({report['query']['examples']} predictions), {out / 'adapt.json'}")
    return lines


# ---------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fedmeta-adapt",
        description="Personalise a model exported by fedmeta-server on your own support set, then predict your "
                    "query set. Images: a folder of class sub-folders (png/jpg; dark strokes on light paper, as "
                    "in Omniglot). Tables: a CSV with a header, input columns then the target (a value for "
                    "regression, a class label for classification).",
    )
    parser.add_argument("--model", required=True, type=Path, metavar="PATH",
                        help="RUN_DIR/model (model.json + model.safetensors) or the run directory itself")
    parser.add_argument("--support", required=True, type=Path, metavar="PATH",
                        help="labelled examples to adapt on: a folder of class sub-folders of images, or a CSV")
    parser.add_argument("--query", required=True, type=Path, metavar="PATH",
                        help="examples to predict: one image, a folder of images (flat, or class sub-folders to "
                             "also score accuracy), or a CSV (without the target column, or with it to also score); "
                             "each is predicted as if alone (unless the model uses --norm batch)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for personalised.safetensors, predictions.csv and adapt.json")
    parser.add_argument("--steps", type=int, help="adaptation SGD steps (default: model.json adapt.steps)")
    parser.add_argument("--lr", type=float, help="adaptation learning rate (default: model.json adapt.lr)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    add_model_import_argument(parser)
    finetune.add_arguments(parser)
    return parser


def _settings(args: argparse.Namespace, exported: Exported) -> tuple[int, float, torch.device]:
    steps = args.steps if args.steps is not None else exported.adapt.get("steps")
    lr = args.lr if args.lr is not None else exported.adapt.get("lr")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"--steps: expected an integer >= 0 (or adapt.steps in model.json), got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (0 < lr < math.inf):
        raise ValueError(f"--lr: expected a positive finite number (or adapt.lr in model.json), got {lr!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: expected cpu or cuda[:N], got {args.device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    return steps, float(lr), device


def write_outputs(out: Path, result: Result) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    metadata = {"algorithm": report["algorithm"], "task": report["task"], "steps": str(report["steps"]),
                "lr": repr(report["lr"]), "base_parameter_version": report["parameter_version"],
                "fine_tune_steps": str(report.get("fine_tune", {}).get("best_step", 0))}
    if report["support"]["classes"]:
        metadata["classes"] = json.dumps(report["support"]["classes"])
    save_file({k: v.cpu().contiguous() for k, v in result.adapted.items()}, str(out / "personalised.safetensors"),
              metadata=metadata)
    with open(out / "predictions.csv", "w", newline="") as f:
        csv.writer(f).writerows([result.header, *result.rows])
    (out / "adapt.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        exported = load_exported(args.model, allowed_imports=model_imports(args))
        steps, lr, device = _settings(args, exported)
        tuning = finetune.from_args(args)
        support = read_examples(args.support, exported=exported, support=None)
        if not support.names:
            raise ValueError(f"--support {args.support}: expected labelled examples, got none")
        first = exported if exported.clusters == 1 else dataclasses.replace(
            exported, params=split(exported.params, exported.clusters)[0], clusters=1)
        model, theta = prepare(first, support, device)
        query = read_examples(args.query, exported=exported, support=support)
        if not query.names:
            raise ValueError(f"--query {args.query}: expected examples to predict, got none")
        if exported.clusters > 1:
            result = choose_cluster(exported, support, query, device, steps=steps, lr=lr, fine_tune=tuning)
        else:
            result = personalise(exported, model, theta, support, query, steps=steps, lr=lr, fine_tune=tuning)
    except ValueError as exc:
        parser.error(str(exc))
    result.report["support"]["path"], result.report["query"]["path"] = str(args.support), str(args.query)
    try:
        write_outputs(args.out, result)
    except OSError as exc:
        print(f"fedmeta-adapt: error: --out {args.out}: cannot write there ({exc})", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result.report, args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
