"""fedmeta-adapt: personalise an exported meta-learned model on a new data holder's own few examples.

theta' = adapt(theta; support) with the run's algorithm (k SGD steps, lr from model.json
unless given), then theta' predicts the query set. Inputs are a folder of class
sub-folders of images (grayscale, inverted: dark strokes on light paper become 1.0 on
0.0, see common/images.py) or a CSV with a header (inputs, then the target column).
"""

from __future__ import annotations

import argparse
import csv
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

from fedmeta.common.algorithms import get_algorithm
from fedmeta.common.algorithms.inner import EXTRA, forward
from fedmeta.common.cli import OneLineErrorParser, add_model_import_argument, model_imports
from fedmeta.common.images import IMAGE_SUFFIXES, load_image, load_image_folder
from fedmeta.common.models import ModelSpec, build_model, check_model_spec, uses_batch_statistics
from fedmeta.common.tasks import is_classification, loss_for

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Exported:
    """An exported model: model/model.json plus model/model.safetensors (see server/rundir.py)."""

    folder: Path
    spec: ModelSpec
    algorithm: str
    task: str
    params: Params
    adapt: dict[str, Any]
    version: str
    allowed_imports: frozenset[str] = frozenset()  # the local operator's --allow-model-import, not the file's


@dataclass(frozen=True)
class Examples:
    """x [N, ...] float32; y [N] int64 class indices or [N, 1] float32 targets, or None; a name per row."""

    x: torch.Tensor
    y: torch.Tensor | None
    names: tuple[str, ...]
    classes: tuple[str, ...]


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
    return Exported(folder, spec, algorithm, task, params, adapt, str(meta.get("parameter_version", "")),
                    frozenset(allowed_imports))


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

def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {text!r} (NaN and infinities are refused)")
    return value


def read_csv(path: Path, *, inputs: int | None, classification: bool, classes: tuple[str, ...] | None,
             target_required: bool) -> Examples:
    """A CSV with a header: `inputs` numeric columns, then the target (a value, or a class label of any text).

    `inputs` None takes every column but the last. The target may be left out unless
    `target_required`. With `classes` given (the support set's), labels must be among them;
    otherwise the sorted unique labels are the classes 0..N-1.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read this CSV file ({exc})") from exc
    if not rows:
        raise ValueError(f"{path}: expected a header row and examples, got an empty file")
    header = rows[0][1]
    if all(_is_number(c) for c in header):
        raise ValueError(f"{path}: expected a header row (column names) first, got numbers {header[:4]!r}")
    n_in = len(header) - 1 if inputs is None else inputs
    allowed = [n_in + 1] if target_required else [n_in, n_in + 1]
    if n_in < 1 or len(header) not in allowed:
        target = " + target" if target_required else ", then optionally the target"
        raise ValueError(f"{path}: expected {' or '.join(map(str, allowed))} columns ({n_in} input"
                         f"{'s' * (n_in != 1)}{target}), got {len(header)}")
    has_target = len(header) == n_in + 1
    xs: list[list[float]] = []
    targets: list[str] = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path} line {line}: expected {len(header)} columns like the header, got {len(row)}")
        xs.append([_number(row[j], f"{path} line {line} column {header[j]!r}") for j in range(n_in)])
        if has_target:
            targets.append(row[n_in].strip())
    x = torch.tensor(xs, dtype=torch.float32).reshape(len(xs), n_in)
    names = tuple(str(i) for i in range(len(xs)))
    if not has_target:
        return Examples(x, None, names, classes or ())
    if not classification:
        y = [_number(t, f"{path} line {rows[i + 1][0]} column {header[n_in]!r}") for i, t in enumerate(targets)]
        return Examples(x, torch.tensor(y, dtype=torch.float32).reshape(-1, 1), names, ())
    if any(not t for t in targets):
        raise ValueError(f"{path}: expected a class label in every row of column {header[n_in]!r}, got an empty one")
    if classes is None:
        classes = tuple(sorted(set(targets)))
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not classes of the support set {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return Examples(x, torch.tensor([index[t] for t in targets], dtype=torch.int64), names, classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_examples(path: Path, *, exported: Exported, support: Examples | None) -> Examples:
    """The support set (support None) or the query set, from an image folder or a CSV file."""
    flag = "--support" if support is None else "--query"
    classification = is_classification(exported.task)
    if path.is_dir():
        if not classification:
            raise ValueError(f"{flag} {path}: image folders need a classification model; this one is for "
                             f"{exported.task!r} regression: give a CSV")
        size = int(exported.spec.kwargs.get("image_size", 28))
        images = load_image_folder(path, size, classes=None if support is None else support.classes)
        if support is None and images.labels is None:
            raise ValueError(f"--support {path}: expected one sub-folder of images per class, got images only")
        y = None if images.labels is None else torch.from_numpy(images.labels)
        return Examples(torch.from_numpy(images.pixels), y, images.names, images.classes)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file or folder")
    if support is not None and path.suffix.lower() in IMAGE_SUFFIXES:  # one drawing to predict
        if not classification:
            raise ValueError(f"--query {path}: an image needs a classification model; this one is for "
                             f"{exported.task!r} regression: give a CSV")
        size = int(exported.spec.kwargs.get("image_size", 28))
        pixels = torch.from_numpy(load_image(path, size)).to(torch.float32).div(255.0).reshape(1, 1, size, size)
        return Examples(pixels, None, (path.name,), support.classes)
    inputs = exported.spec.kwargs.get("in_features")
    if support is not None:
        inputs = support.x.shape[1]
    elif not isinstance(inputs, int):
        inputs = None
    return read_csv(path, inputs=inputs, classification=classification, target_required=support is None,
                    classes=None if support is None else support.classes)


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
    prototypes = get_algorithm(exported.algorithm).predict is not None  # ProtoNets: any number of classes
    if is_classification(exported.task) and not prototypes and len(support.classes) != outputs:
        raise ValueError(f"--support: expected {outputs} classes, as the model has {outputs} outputs; got "
                         f"{len(support.classes)} ({', '.join(support.classes[:10])})")
    if not is_classification(exported.task) and outputs != 1:
        raise ValueError(f"the model has {outputs} outputs; a CSV with one target column needs 1")
    return model, theta


@dataclass(frozen=True)
class Result:
    """theta' (personalised.safetensors), the adapt.json report, and predictions.csv as a header and rows."""

    adapted: Params
    report: dict[str, Any]
    header: list[str]
    rows: list[list[str]]


def personalise(exported: Exported, model: nn.Module, theta: Params, support: Examples, query: Examples, *,
                steps: int, lr: float) -> Result:
    """Adapt theta on the support set with the run's algorithm, then predict (and score) the query set."""
    if support.y is None:
        raise ValueError("--support: expected labelled examples, got no targets")
    classification = is_classification(exported.task)
    device = next(iter(theta.values())).device
    xs, ys, xq = support.x.to(device), support.y.to(device), query.x.to(device)
    loss_fn = loss_for(exported.task)
    algorithm = get_algorithm(exported.algorithm)
    adapted = algorithm.adapt(model, theta, xs, ys, loss_fn, steps=steps, lr=lr)
    adapted = {k: v.detach() for k, v in adapted.items()}

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
        "support_loss_post": float(loss_fn(predict(adapted, xs), ys)),
        "query": {"examples": len(query.names), "labelled": query.y is not None},
        "transductive_bn": uses_batch_statistics(model),
    }
    # One forward pass over the whole query set. Only a transductive model (--norm batch) normalises it
    # together, as in its evaluation; every other model predicts each query alone, the same in any batch.
    pred = predict(adapted, xq).cpu()
    if query.y is not None:
        metric = "query_accuracy" if classification else "query_mse"
        report[f"{metric}_pre"] = _query_metric(predict(theta, xq).cpu(), query.y, classification)
        report[metric] = _query_metric(pred, query.y, classification)
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


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    support, classes = report["support"], report["support"]["classes"]
    of_classes = f" of {len(classes)} classes" if classes else ""
    head = (f"fedmeta-adapt: {report['algorithm']} model for {report['task']}, {report['steps']} steps at lr "
            f"{report['lr']:g} on {support['examples']} support examples{of_classes}")
    lines = [head, f"  support loss      {report['support_loss_pre']:.4f} -> {report['support_loss_post']:.4f}"]
    for metric, name in (("query_accuracy", "query accuracy"), ("query_mse", "query MSE")):
        if metric in report:
            lines.append(f"  {name:<17} {report[metric + '_pre']:.4f} -> {report[metric]:.4f}"
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
                "lr": repr(report["lr"]), "base_parameter_version": report["parameter_version"]}
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
        support = read_examples(args.support, exported=exported, support=None)
        if not support.names:
            raise ValueError(f"--support {args.support}: expected labelled examples, got none")
        model, theta = prepare(exported, support, device)
        query = read_examples(args.query, exported=exported, support=support)
        if not query.names:
            raise ValueError(f"--query {args.query}: expected examples to predict, got none")
        result = personalise(exported, model, theta, support, query, steps=steps, lr=lr)
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
