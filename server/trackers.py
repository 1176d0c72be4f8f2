"""Experiment trackers fed by the run's records: TensorBoard (`--tensorboard DIR`) and MLflow (`--mlflow-uri URI`).

RunState.record hands every metrics.jsonl record to each sink (RunState.summary the final
evaluation), so the trackers see exactly what metrics.jsonl holds:

    training round r   train/meta_loss, train/loss_pre, train/round_s, train/client_compute_s
                       (mean seconds of a client step over the round's clients), step r
    validation         validation/<metric>, validation/<metric>_pre, step = rounds trained
    evaluation         eval/<metric>_pre, eval/<metric>_post, and the adaptation curve
                       eval/adaptation_curve, step = inner steps (0 ... --eval-steps)

MLflow names the same values with dots instead of slashes; its run is tagged
fedmeta.run_id and found again on resume (params, the run's settings, are logged once).
Both are optional extras: a missing one is a one-line RuntimeError naming the flag.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger("fedmeta.server")

EXPERIMENT = "fedmeta"
RUN_TAG = "fedmeta.run_id"
# MLflow's limit on a param value (recent stores take 6000; long ones are cut, never refused).
MAX_PARAM_CHARS = 500


class Sink(Protocol):
    """Something RunState feeds: every record, then the summary, then close()."""

    def record(self, record: Mapping[str, Any]) -> None: ...

    def summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics.jsonl record; only finite numbers."""
    if record.get("event") == "validation":
        step = int(record["rounds_trained"])
        name = record["val_metric"]
        values = {f"validation/{name}": record.get("val_value"), f"validation/{name}_pre": record.get(
            "val_accuracy_pre" if name == "accuracy" else "val_loss_pre")}
    else:
        step = int(record["round"])
        values = {"train/meta_loss": record.get("meta_loss"), "train/loss_pre": record.get("loss_pre"),
                  "train/round_s": record.get("round_s"), "train/client_compute_s": record.get("client_compute_s")}
    return step, _finite(values)


def eval_scalars(summary: Mapping[str, Any]) -> tuple[dict[str, float], list[float]]:
    """The final evaluation's pooled metrics and its adaptation curve (summary.json "eval")."""
    ev = summary.get("eval") or {}
    values = {f"eval/{k}": ev.get(k) for k in ("loss_pre", "loss_post", "accuracy_pre", "accuracy_post", "ci95")}
    curve = ev.get("curve") if isinstance(ev.get("curve"), list) else []
    return _finite(values), [float(v) for v in curve if isinstance(v, (int, float))]


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    """TensorBoard event files in `logdir` (torch.utils.tensorboard; needs the tensorboard extra)."""

    def __init__(self, logdir: str, *, next_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("--tensorboard needs tensorboard: pip install 'fedmeta[tensorboard]'") from None
        # purge_step: on resume, events of rounds after the checkpoint (trained again) are dropped.
        self.writer = SummaryWriter(log_dir=logdir, purge_step=next_round or None)

    def record(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def summary(self, summary: Mapping[str, Any]) -> None:
        values, curve = eval_scalars(summary)
        rounds = int(summary.get("rounds_completed", 0))
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, rounds)
        for k, value in enumerate(curve):
            self.writer.add_scalar("eval/adaptation_curve", value, k)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{key}.")
        else:
            out[key] = str(v)[:MAX_PARAM_CHARS]
    return out


class MLflow:
    """An MLflow run at `uri` (experiment "fedmeta"), found again by its fedmeta.run_id tag on resume."""

    def __init__(self, uri: str, *, run_id: str, params: Mapping[str, Any]) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; a file: URI is that request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RuntimeError("--mlflow-uri needs mlflow: pip install 'fedmeta[mlflow]'") from None
        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(EXPERIMENT))
        quoted = run_id.replace("'", "\\'")
        found = self.client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{quoted}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, tags={RUN_TAG: run_id}, run_name=run_id).info.run_id
            flat = _flatten(params)
            items = [Param(k, v) for k, v in sorted(flat.items())]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag.replace("/", "."), value, now, step) for tag, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def record(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        self._log(values, step)

    def summary(self, summary: Mapping[str, Any]) -> None:
        values, curve = eval_scalars(summary)
        self._log(values, int(summary.get("rounds_completed", 0)))
        for k, value in enumerate(curve):
            self._log({"eval/adaptation_curve": value}, k)
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        pass


def open_trackers(*, tensorboard: str | None, mlflow_uri: str | None, run_id: str, params: Mapping[str, Any],
                  next_round: int) -> list[Sink]:
    """The trackers the flags ask for (RuntimeError naming the flag when its extra is missing)."""
    sinks: list[Sink] = []
    if tensorboard is not None:
        sinks.append(TensorBoard(tensorboard, next_round=next_round))
        log.info("TensorBoard event files in %s (tensorboard --logdir %s)", tensorboard, tensorboard)
    if mlflow_uri is not None:
        try:
            sinks.append(MLflow(mlflow_uri, run_id=run_id, params=params))
        except RuntimeError:
            raise
        except Exception as exc:  # noqa: BLE001 (MlflowException, requests' errors: one line naming the flag)
            raise RuntimeError(f"--mlflow-uri {mlflow_uri}: {type(exc).__name__}: {str(exc)[:300]}") from None
        log.info("logging to MLflow at %s, experiment %s, run %s", mlflow_uri, EXPERIMENT, run_id)
    return sinks


def check_installed(*, tensorboard: str | None, mlflow_uri: str | None) -> None:
    """Before the run starts: RuntimeError naming the flag and the pip command for a missing extra."""
    import importlib.util

    if tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError("--tensorboard needs tensorboard: pip install 'fedmeta[tensorboard]'")
    if mlflow_uri is not None and importlib.util.find_spec("mlflow") is None:
        raise RuntimeError("--mlflow-uri needs mlflow: pip install 'fedmeta[mlflow]'")
