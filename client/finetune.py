"""fedmeta-adapt's fine-tuning past the few-shot steps, for a data holder with more than a few examples.

After the algorithm's own adaptation theta' = adapt(theta; fit), Adam runs over every model
parameter (the algorithm's "meta.*" extras stay as learned) on the loss of the fit part of the
support set,

    phi_0 = theta',   phi_{s+1} = Adam(phi_s, grad L(rule_phi(x_fit), y_fit)),

and returns phi_b, b = argmin_s L(rule_phi_s(x_held), y_held) over s = 0..S: the held-out loss of
what it returns is never above that of theta' (b = 0 when no step helps). `rule` is the algorithm's
prediction rule: the model's forward pass (support-normalised models use the fit part's statistics),
or for ProtoNets minus the squared distances to the fit part's class prototypes, so the embedding is
fine-tuned with the prototypical loss. The held-out slice is a seeded draw of --fine-tune-holdout of
the support set, at least one example per class (and one left per class to fit on).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmeta.common.algorithms import Algorithm
from fedmeta.common.algorithms.inner import EXTRA, forward
from fedmeta.common.tasks import LossFn
from fedmeta.client.adapt_inputs import Examples, Params

Rule = Callable[[Params, torch.Tensor], torch.Tensor]
SPLIT_SEED = 0


@dataclass(frozen=True)
class FineTune:
    """--fine-tune-steps Adam steps at --fine-tune-lr, early-stopped on a --fine-tune-holdout slice;
    patience 0 runs every step (the best is kept either way)."""

    steps: int
    lr: float = 1e-3
    holdout: float = 0.2
    patience: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning past the few-shot steps (for more than a few examples)")
    group.add_argument("--fine-tune-steps", type=int, default=0, metavar="N",
                       help="after the algorithm's adaptation, N Adam steps over all model parameters on the "
                            "support set less a held-out slice, keeping the parameters with the best held-out "
                            "loss (default 0: none)")
    group.add_argument("--fine-tune-lr", type=float, metavar="LR", help="Adam's learning rate (default 0.001)")
    group.add_argument("--fine-tune-holdout", type=float, metavar="FRACTION",
                       help="fraction of the support set held out for early stopping, at least one example per "
                            "class (default 0.2)")
    group.add_argument("--fine-tune-patience", type=int, metavar="N",
                       help="stop after N steps without a better held-out loss (default: run every step)")


def from_args(args: argparse.Namespace) -> FineTune | None:
    """The fine-tuning the flags ask for (None: none); ValueError naming the flag for a bad value."""
    steps = args.fine_tune_steps
    if steps < 0:
        raise ValueError(f"--fine-tune-steps: expected an integer >= 0, got {steps}")
    extras = {"--fine-tune-lr": args.fine_tune_lr, "--fine-tune-holdout": args.fine_tune_holdout,
              "--fine-tune-patience": args.fine_tune_patience}
    if steps == 0:
        given = [flag for flag, value in extras.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]}: only applies with --fine-tune-steps N > 0")
        return None
    lr = 1e-3 if args.fine_tune_lr is None else args.fine_tune_lr
    holdout = 0.2 if args.fine_tune_holdout is None else args.fine_tune_holdout
    patience = 0 if args.fine_tune_patience is None else args.fine_tune_patience
    if not (0 < lr < math.inf):
        raise ValueError(f"--fine-tune-lr: expected a positive finite number, got {lr!r}")
    if not (0 < holdout < 1):
        raise ValueError(f"--fine-tune-holdout: expected a fraction strictly between 0 and 1, got {holdout!r}")
    if patience < 0:
        raise ValueError(f"--fine-tune-patience: expected an integer >= 0, got {patience}")
    return FineTune(steps=steps, lr=lr, holdout=holdout, patience=patience)


def _subset(examples: Examples, index: torch.Tensor) -> Examples:
    y = None if examples.y is None else examples.y[index]
    return Examples(examples.x[index], y, tuple(examples.names[i] for i in index.tolist()), examples.classes)


def split_support(support: Examples, fraction: float, *, classification: bool) -> tuple[Examples, Examples]:
    """(fit, held out): a seeded `fraction` of the support set held out, per class for classification."""
    if support.y is None:
        raise ValueError("--support: expected labelled examples, got no targets")
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    groups = ([torch.nonzero(support.y == c).flatten() for c in range(len(support.classes))] if classification
              else [torch.arange(len(support.names))])
    fit: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    for c, members in enumerate(groups):
        if len(members) < 2:
            what = f"class {support.classes[c]!r} has" if classification else "the support set has"
            raise ValueError(f"--fine-tune-holdout: {what} {len(members)} example(s); holding one out for early "
                             "stopping and fitting on the rest needs at least 2" + (" per class" * classification))
        order = members[torch.randperm(len(members), generator=gen)]
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(order[:k])
        fit.append(order[k:])
    return _subset(support, torch.sort(torch.cat(fit)).values), _subset(support, torch.sort(torch.cat(held)).values)


def prediction_rule(algorithm: Algorithm, model: nn.Module, fit: Examples, device: torch.device) -> Rule:
    """Differentiable outputs of params on x: the algorithm's rule with the fit part as the support set."""
    xs = fit.x.to(device)
    ys = None if fit.y is None else fit.y.to(device)
    predict = algorithm.predict
    if predict is not None:
        return lambda p, x: predict(model, p, xs, ys, x)
    return lambda p, x: forward(model, p, x, xs)


def metric(out: torch.Tensor, y: torch.Tensor, classification: bool) -> float:
    if classification:
        return float((out.argmax(-1) == y).float().mean())
    return float(torch.nn.functional.mse_loss(out, y))


def fine_tune(rule: Rule, loss_fn: LossFn, adapted: Params, fit: Examples, held: Examples, config: FineTune, *,
              classification: bool) -> tuple[Params, dict[str, Any]]:
    """Adam from `adapted` on the fit loss; the parameters with the best held-out loss and the report."""
    device = next(iter(adapted.values())).device
    xf, yf, xh, yh = (t.to(device) for t in (fit.x, fit.y, held.x, held.y))  # type: ignore[union-attr]
    phi = {k: v.detach().clone().requires_grad_(not k.startswith(EXTRA)) for k, v in adapted.items()}
    optimiser = torch.optim.Adam([v for v in phi.values() if v.requires_grad], lr=config.lr)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            out = rule(phi, xh)
            return float(loss_fn(out, yh)), metric(out, yh, classification)

    start_loss, start_metric = held_out()
    best = (start_loss, start_metric, 0, {k: v.detach().clone() for k, v in phi.items()})
    run = 0
    for s in range(1, config.steps + 1):
        optimiser.zero_grad()
        loss = loss_fn(rule(phi, xf), yf)
        if not torch.isfinite(loss):
            break  # diverged: keep the best so far
        loss.backward()
        optimiser.step()
        run = s
        value, score = held_out()
        if value < best[0]:
            best = (value, score, s, {k: v.detach().clone() for k, v in phi.items()})
        elif config.patience and s - best[2] >= config.patience:
            break
    name = "accuracy" if classification else "mse"
    report = {"steps": config.steps, "steps_run": run, "best_step": best[2], "lr": config.lr,
              "holdout_fraction": config.holdout, "patience": config.patience or None,
              "fit_examples": len(fit.names), "holdout_examples": len(held.names), "holdout": list(held.names),
              "holdout_loss_adapted": start_loss, "holdout_loss": best[0],
              f"holdout_{name}_adapted": start_metric, f"holdout_{name}": best[1]}
    return best[3], report


def summary_lines(report: dict[str, Any]) -> list[str]:
    ft = report.get("fine_tune")
    if not ft:
        return []
    name = "accuracy" if "holdout_accuracy" in ft else "MSE"
    key = "holdout_accuracy" if name == "accuracy" else "holdout_mse"
    return [f"  fine-tuning       {ft['steps_run']} of {ft['steps']} Adam steps at lr {ft['lr']:g} on "
            f"{ft['fit_examples']} examples, best held-out loss at step {ft['best_step']} (fit loss then "
            f"{ft['fit_loss']:.4f})",
            f"  held-out loss     {ft['holdout_loss_adapted']:.4f} -> {ft['holdout_loss']:.4f}"
            + (f"   held-out accuracy {ft[key + '_adapted']:.4f} -> {ft[key]:.4f}" if name == "accuracy" else "")
            + f"  ({ft['holdout_examples']} held-out support examples)"]
