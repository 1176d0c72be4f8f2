"""Watching a live federation: the Prometheus endpoint, TensorBoard and MLflow, JSON logs, progress on a pipe.

Real coordinators (in-process, and a `fedmeta-server` process) and real client processes on
127.0.0.1; hostile updates from raw stubs; the endpoint scraped over HTTP and parsed with
prometheus_client's parser; the trackers read back with their own readers.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from fedmeta.common.logformat import LOG_KEYS
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.common.refusal import Reason, reason_from_metadata
from fedmeta.server.prometheus import MetricsServer
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration
prometheus_parser = pytest.importorskip("prometheus_client.parser")

FAST = ["--tasks-per-client", "4", "--eval-tasks-per-client", "5", "--eval-queries", "20"]
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def refuse(stub: pb_grpc.CoordinatorStub, messages: list[pb.SubmitUpdateRequest]) -> Reason | None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitUpdate(iter(messages), timeout=10)
    return reason_from_metadata(info.value.trailing_metadata())  # type: ignore[attr-defined]


def test_prometheus_counts_rounds_accepted_updates_and_refusals_by_reason(inprocess_server, processes,
                                                                         tmp_path: Path) -> None:
    s = inprocess_server(rounds=3, clients_per_round=1, min_clients=1, tasks_per_client=4, eval_tasks_per_client=5,
                         eval_queries=20, round_deadline_s=60.0)
    metrics = MetricsServer(s.coordinator, "127.0.0.1", 0)
    try:
        header = pb.UpdateHeader(run_id="not-this-run", round=0, client_id="intruder", weight=1.0,
                                 kind=pb.UPDATE_KIND_META_GRADIENT, metrics={"loss_post": 1.0})
        assert refuse(s.stub, [pb.SubmitUpdateRequest(header=header)]) is Reason.WRONG_RUN
        assert refuse(s.stub, [pb.SubmitUpdateRequest(end=pb.UpdateEnd())]) is Reason.BAD_STREAM
        during = scrape(metrics.port)  # before any client: the run is live, nothing accepted yet
        assert value(during, "fedmeta_updates_refused_total", reason="WRONG_RUN") == 1
        assert value(during, "fedmeta_updates_refused_total", reason="BAD_STREAM") == 1
        assert value(during, "fedmeta_updates_accepted_total", kind="train") == 0
        assert value(during, "fedmeta_rounds") == 3 and value(during, "fedmeta_upload_slots") == 2

        ids = ["site-alpha"]
        clients = [processes.client(s.port, cid, i) for i, cid in enumerate(ids)]
        wait_for(s.coordinator.finished.is_set, timeout_s=120, what="the run to finish")
        after = scrape(metrics.port)
    finally:
        metrics.close()
    for c in clients:
        c.wait(timeout_s=30)

    rounds = [r for r in records(s.coordinator.config.run_dir) if "round" in r]
    summary = s.coordinator.summary
    assert summary is not None and len(rounds) == 3
    assert value(after, "fedmeta_rounds_completed_total") == 3
    assert value(after, "fedmeta_next_round") == 3
    assert value(after, "fedmeta_round_duration_seconds_count") == 3
    assert value(after, "fedmeta_round_duration_seconds_sum") == pytest.approx(sum(r["round_s"] for r in rounds))
    # every update the run counted, and only those: its rounds' answers, its evaluation's clients
    assert value(after, "fedmeta_updates_accepted_total", kind="train") == sum(r["clients_answered"] for r in rounds)
    assert value(after, "fedmeta_updates_accepted_total", kind="evaluation") == summary["eval"]["clients"] == 1
    # the client's training updates (7 kB) rode on its next long-poll, each of them
    assert value(after, "fedmeta_updates_carried_total") == sum(r["clients_answered"] for r in rounds) == 3
    assert value(after, "fedmeta_updates_refused_total", reason="WRONG_RUN") == 1
    assert value(after, "fedmeta_updates_refused_total", reason="BAD_STREAM") == 1
    assert value(after, "fedmeta_train_metric", metric="loss_post") == rounds[-1]["meta_loss"]
    assert value(after, "fedmeta_train_metric", metric="compute_s") == rounds[-1]["client_compute_s"]
    assert value(after, "fedmeta_bytes_received_total") >= rounds[-1]["bytes_received"] > 0
    assert value(after, "fedmeta_bytes_sent_total") >= rounds[-1]["bytes_sent"] > 0
    assert value(after, "fedmeta_upload_slots_in_use") == 0
    assert value(after, "process_resident_memory_bytes") > 10e6
    # no client id, and no peer-chosen string, is ever a label value
    labels = {v for samples in after.values() for key in samples for _, v in key}
    assert not labels & {*ids, "intruder", "not-this-run"}, labels
    assert {v for k, v in next(iter(after["fedmeta_updates_refused_total"])) if k == "reason"} <= {r.value for r in Reason} | {"UNSPECIFIED"}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_serves_metrics_writes_tensorboard_and_mlflow_and_json_logs_on_a_pipe(processes, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, tb, mlruns = tmp_path / "run", tmp_path / "tb", tmp_path / "mlruns"
    rounds = 30
    server = processes.server(run_dir, "--rounds", str(rounds), "--clients-per-round", "2", "--min-clients", "2",
                              "--eval-every", "15", "--log-format", "json", "--metrics-port", "0",
                              "--tensorboard", str(tb), "--mlflow-uri", f"file:{mlruns}", *FAST)

    def metrics_port() -> int | None:
        return next((int(line.rsplit(":", 1)[1].split("/")[0]) for line in server.lines
                     if line.startswith("metrics on http://127.0.0.1:")), None)

    port = wait_for(metrics_port, timeout_s=60, what="the metrics endpoint")
    live = scrape(port)  # no client yet: the run cannot have finished
    assert value(live, "fedmeta_rounds") == rounds and value(live, "fedmeta_rounds_completed_total") == 0
    clients = [processes.client(server.port, f"site-{i}", i, "--log-format", "json") for i in range(2)]
    assert server.wait(timeout_s=180) == 0, server.output()[-3000:]
    for c in clients:
        assert c.wait(timeout_s=30) == 0

    # --log-format json: every log line is one JSON object with the keys; only the stdout prints are not
    out = server.output().splitlines()
    logs = _json_lines(server.output())
    assert all(list(entry)[: len(LOG_KEYS)] == list(LOG_KEYS) for entry in logs)
    text = [line for line in out if not line.startswith("{")]
    assert not [line for line in text if " INFO " in line or " WARNING " in line], text
    assert {"run_started", "round", "run_finished"} <= {e["event"] for e in logs}
    # a pipe gets the first and last round, and a round line at most every 5 s in between (never one a round)
    lines = [e for e in logs if e["event"] == "round"]
    assert lines[0]["round"] == 0 and lines[-1]["round"] == rounds - 1 and len(lines) < rounds / 2
    times = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() for e in lines[:-1]]
    assert all(b - a >= 5.0 - 0.01 for a, b in zip(times, times[1:])), times
    assert len(logs) < rounds, [e["message"] for e in logs]
    for i, c in enumerate(clients):
        entries = [json.loads(line) for line in c.output().splitlines() if line.strip()]
        assert entries and all(e["client"] == f"site-{i}" for e in entries)

    history = records(run_dir)
    trained = [r for r in history if "round" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = summary["eval"]["curve"]
    # TensorBoard: read back with its own EventAccumulator
    acc = EventAccumulator(str(tb))
    acc.Reload()
    meta = acc.Scalars("train/meta_loss")
    assert [e.step for e in meta] == list(range(rounds))
    assert [e.value for e in meta] == pytest.approx([r["meta_loss"] for r in trained], rel=1e-6)
    assert [e.step for e in acc.Scalars("validation/mse")] == [15, 30]
    assert [e.value for e in acc.Scalars("eval/adaptation_curve")] == pytest.approx(curve, rel=1e-6)
    assert len(acc.Scalars("train/client_compute_s")) == rounds
    # MLflow: read back from the file store with its client
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{mlruns}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedmeta").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedmeta.run_id"] == summary["run_id"]
    assert run.data.params["rounds"] == str(rounds) and run.data.params["algorithm"] == "maml"
    got = client.get_metric_history(run.info.run_id, "train.meta_loss")
    assert sorted(m.step for m in got) == list(range(rounds))
    assert [m.value for m in sorted(got, key=lambda m: m.step)] == pytest.approx([r["meta_loss"] for r in trained])
    evcurve = sorted(client.get_metric_history(run.info.run_id, "eval.adaptation_curve"), key=lambda m: m.step)
    assert [m.value for m in evcurve] == pytest.approx(curve)
    assert math.isfinite(run.data.metrics["eval.loss_post"])


class _Source:
    """What the exporter reads, without a run (the HTTP server's bounds are the subject here)."""

    def __init__(self) -> None:
        from fedmeta.server.telemetry import Telemetry

        self.telemetry = Telemetry()
        self.config = type("C", (), {"rounds": 1, "max_concurrent_uploads": 1})()
        self.next_round = self.bytes_sent = self.bytes_received = 0

    def live_clients(self) -> int:
        return 0

    def uploads_in_use(self) -> int:
        return 0


def test_metrics_endpoint_bounds_its_connections() -> None:
    import socket

    from fedmeta.server import prometheus

    metrics = MetricsServer(_Source(), "127.0.0.1", 0)  # type: ignore[arg-type]
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", metrics.port), timeout=10)
                for _ in range(prometheus.MAX_CONNECTIONS)]

        def refused() -> bool:
            try:
                scrape(metrics.port)
            except (OSError, ConnectionError, urllib.error.URLError):  # closed unanswered: every slot is held
                return True
            return False

        wait_for(refused, timeout_s=30, what="a connection over the bound to be closed")
        for s in idle:
            s.close()
        # the idle connections' slots come back once they close: scraping works again
        wait_for(lambda: not refused(), timeout_s=30, what="the endpoint to answer again")
        assert value(scrape(metrics.port), "fedmeta_rounds") == 1
    finally:
        for s in idle:
            s.close()
        metrics.close()
