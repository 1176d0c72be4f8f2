"""Observability without sockets: JSON log lines, progress lines on a pipe, telemetry labels, trackers' inputs."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from fedmeta.common.logformat import LOG_KEYS, JsonFormatter, fields, setup_logging
from fedmeta.common.refusal import Reason
from fedmeta.common.textsafe import clip
from fedmeta.server import cli, prometheus, trackers
from fedmeta.server.config import build
from fedmeta.server.telemetry import KINDS, REASONS, Telemetry


def _format(formatter: logging.Formatter, msg: str, *args: object, **extra: object) -> str:
    record = logging.LogRecord("fedmeta.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return formatter.format(record)


def test_json_log_line_has_every_key_and_stays_one_line_for_hostile_peer_text() -> None:
    hostile = 'evil"\n{"level": "info", "message": "forged"}\x1b[2J'
    line = _format(JsonFormatter(), "update from %s refused", clip(hostile, 64),
                   **fields(event="update_refused", round=3, client=clip(hostile, 64)))
    assert "\n" not in line and "\x1b" not in line
    out = json.loads(line)
    assert list(out)[: len(LOG_KEYS)] == list(LOG_KEYS)
    assert out["event"] == "update_refused" and out["round"] == 3 and out["level"] == "warning"
    # clip already wrote the control characters as \xNN: the forged "line" is text inside one message.
    assert "\\x0a" in out["message"] and "\\x1b" in out["message"] and out["client"].startswith('evil"')
    assert out["time"].endswith("Z") and out["time"][10] == "T"


def test_json_log_line_defaults_and_a_client_process_names_itself() -> None:
    out = json.loads(_format(JsonFormatter(client="site-7"), "plain %d", 5))
    assert (out["event"], out["round"], out["client"], out["message"]) == ("log", None, "site-7", "plain 5")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in out["exception"]


def test_setup_logging_json_writes_json_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("info", "json")
        logging.getLogger("fedmeta.x").info("hello", extra=fields(event="e", round=1))
        logging.getLogger("fedmeta.x").debug("hidden")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["event"] == "e"
    with pytest.raises(ValueError, match="--log-format"):
        setup_logging("info", "xml")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("round_s", [0.01, 0.5, 2.0, 40.0])
def test_progress_on_a_pipe_writes_first_last_and_at_most_one_line_per_5_s(
        round_s: float, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    rounds = 200
    config = build({"run_dir": str(tmp_path / "run"), "rounds": rounds})
    clock = Clock()
    progress = cli.Progress(config, 0, bar=False, clock=clock)
    with caplog.at_level(logging.INFO, logger="fedmeta.server"):
        for r in range(rounds):
            clock.t += round_s
            progress({"round": r, "meta_loss": 1.0, "clients_answered": 2, "clients_sampled": 2, "round_s": round_s})
    logged = [rec for rec in caplog.records if getattr(rec, "event", None) == "round"]
    indices = [rec.round for rec in logged]  # type: ignore[attr-defined]
    assert indices[0] == 0 and indices[-1] == rounds - 1
    wall = rounds * round_s
    assert len(logged) <= 2 + wall / cli.MIN_LINE_S
    # never more often than every 10% of rounds, except a heartbeat on slow runs and the last round
    gaps = [b - a for a, b in zip(indices, indices[1:-1])]
    assert all(g >= rounds // 10 or g * round_s >= cli.HEARTBEAT_S for g in gaps), gaps
    if wall < cli.MIN_LINE_S:
        assert indices == [0, rounds - 1]
    else:  # a line at least every 10% of rounds or every HEARTBEAT_S, whichever comes first
        assert len(logged) >= min(10, wall / cli.HEARTBEAT_S)


def test_telemetry_counts_under_a_bounded_label_set() -> None:
    t = Telemetry()
    t.update_accepted("train")
    t.update_refused(Reason.BAD_METRICS)
    t.update_refused(None)
    t.record({"round": 0, "meta_loss": 2.0, "loss_pre": 3.0, "client_compute_s": 0.1, "round_s": 0.2})
    t.record({"round": 1, "meta_loss": None, "loss_pre": float("nan"), "round_s": 700.0})
    t.record({"event": "validation", "val_loss": 1.5, "val_loss_pre": 2.5, "rounds_trained": 2})
    s = t.snapshot()
    assert s.rounds_completed == 2 and s.round_buckets[-1] == 2 and s.round_buckets[0] == 0
    assert s.round_buckets[-2] == 1  # 700 s is over the last bound: only +Inf holds it
    assert s.accepted == {"train": 1, "validation": 0, "evaluation": 0}
    assert s.refused["BAD_METRICS"] == 1 and s.refused["UNSPECIFIED"] == 1 and set(s.refused) == set(REASONS)
    assert s.train == {} and s.validation == {"loss_post": 1.5, "loss_pre": 2.5} and s.validations == 1
    with pytest.raises(ValueError, match="update kind"):
        t.update_accepted("a peer's string")
    assert set(KINDS) == set(s.accepted)


def test_every_exported_name_is_in_the_table() -> None:
    names = {m[0] for m in prometheus.METRICS}
    assert {"fedmeta_rounds_completed_total", "fedmeta_updates_refused_total", "fedmeta_round_duration_seconds",
            "process_resident_memory_bytes"} <= names


def test_a_missing_extra_is_one_line_naming_the_flag_and_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(RuntimeError, match=r"^--metrics-port needs prometheus-client: pip install 'fedmeta\[metrics\]'$"):
        prometheus.require()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match=r"^--tensorboard needs tensorboard: pip install 'fedmeta\[tensorboard\]'$"):
        trackers.TensorBoard("unused", next_round=0)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(RuntimeError, match=r"^--mlflow-uri needs mlflow: pip install 'fedmeta\[mlflow\]'$"):
        trackers.MLflow("file:/nonexistent", run_id="r", params={})


def test_tracker_scalars_are_the_records_numbers() -> None:
    step, values = trackers.scalars({"round": 4, "meta_loss": 1.0, "loss_pre": None, "round_s": 0.5,
                                     "client_compute_s": float("inf")})
    assert step == 4 and values == {"train/meta_loss": 1.0, "train/round_s": 0.5}
    step, values = trackers.scalars({"event": "validation", "rounds_trained": 10, "val_metric": "accuracy",
                                     "val_value": 0.8, "val_accuracy": 0.8, "val_accuracy_pre": 0.2})
    assert step == 10 and values == {"validation/accuracy": 0.8, "validation/accuracy_pre": 0.2}
    values, curve = trackers.eval_scalars({"eval": {"loss_pre": 2.0, "loss_post": 1.0, "curve": [2.0, 1.5, 1.0]}})
    assert values == {"eval/loss_pre": 2.0, "eval/loss_post": 1.0} and curve == [2.0, 1.5, 1.0]


def test_the_shipped_dashboard_and_scrape_config_use_only_exported_metrics() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "docker/grafana/fedmeta-dashboard.json").read_text())
    exported = {m[0] for m in prometheus.METRICS}
    exported |= {f"{m[0]}_{s}" for m in prometheus.METRICS if m[1] == "histogram" for s in ("bucket", "sum", "count")}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:fedmeta|process)_[a-z_]+)\b", e)}
    assert len(dashboard["panels"]) >= 10 and used and used <= exported, used - exported
    assert {"fedmeta_updates_refused_total", "fedmeta_round_duration_seconds_bucket"} <= used
    scrape = (root / "docker/prometheus/prometheus.yml").read_text()
    assert "metrics_path: /metrics" in scrape and re.search(r'targets: \["[\w.-]+:9464"\]', scrape)
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(scrape)
    assert config["scrape_configs"][0]["job_name"] == "fedmeta"
    for path in ("docker/grafana/provisioning/dashboards/fedmeta.yml", "docker/grafana/provisioning/datasources/prometheus.yml"):
        assert yaml.safe_load((root / path).read_text())["apiVersion"] == 1
    datasource = yaml.safe_load((root / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} == {datasource["datasources"][0]["uid"]}


def test_mlflow_finds_its_run_again_on_resume(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # so that teardown restores it, whatever MLflow() sets
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # a file: URI is the request for the file store
    uri = f"file:{tmp_path / 'mlruns'}"
    first = trackers.MLflow(uri, run_id="r-1", params={"rounds": 5, "model": {"name": "mlp"}})
    first.record({"round": 0, "meta_loss": 2.0, "round_s": 0.1})
    again = trackers.MLflow(uri, run_id="r-1", params={"rounds": 5, "model": {"name": "mlp"}})  # a restart
    again.record({"round": 1, "meta_loss": 1.0, "round_s": 0.1})
    other = trackers.MLflow(uri, run_id="r-2", params={})
    assert again.run_id == first.run_id != other.run_id
    history = again.client.get_metric_history(again.run_id, "train.meta_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0)]
    assert again.client.get_run(again.run_id).data.params == {"rounds": "5", "model.name": "mlp"}
