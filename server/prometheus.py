"""Prometheus metrics over HTTP (`--metrics-port`; needs the `metrics` extra: prometheus-client).

Every value is read when scraped: the counters of server/telemetry.py, the coordinator's
bytes, live clients and upload slots, and the process's RSS and CPU (prometheus-client's
process collector). The names are in METRICS (the README's table is made from it). Label
values come from fixed sets (update kinds, RefusalReason names, metric-schema names), never
from a peer. The HTTP server is bounded like the gRPC one: at most MAX_CONNECTIONS at once
(more are closed unanswered), each cut after IDLE_S without a byte.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from fedmeta.server.telemetry import KINDS, REASONS, ROUND_BUCKETS_S, Telemetry

log = logging.getLogger("fedmeta.server")

INSTALL = "pip install 'fedmeta[metrics]'"
MAX_CONNECTIONS = 8
IDLE_S = 10.0

# name (as exposed), type, labels, help
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("fedmeta_rounds_completed_total", "counter", "", "training rounds closed by this process"),
    ("fedmeta_next_round", "gauge", "", "index of the next training round (rounds trained so far, across restarts)"),
    ("fedmeta_rounds", "gauge", "", "training rounds the run is configured for (--rounds)"),
    ("fedmeta_round_duration_seconds", "histogram", "", "a training round's wall time, from its opening to its close"),
    ("fedmeta_updates_accepted_total", "counter", "kind", "updates counted, by kind: train, validation, evaluation "
                                                          "(duplicates, acknowledged, are not counted again)"),
    ("fedmeta_updates_refused_total", "counter", "reason", "updates refused, by RefusalReason name (UNSPECIFIED: "
                                                           "no reason)"),
    ("fedmeta_updates_carried_total", "counter", "", "updates that came with a client's long-poll "
                                                      "(WaitForAssignment) instead of a call of their own, "
                                                      "accepted or refused"),
    ("fedmeta_bytes_sent_total", "counter", "", "bytes of gRPC messages sent to clients over the run"),
    ("fedmeta_bytes_received_total", "counter", "", "bytes of gRPC messages received from clients over the run"),
    ("fedmeta_clients_live", "gauge", "", "registered clients that called within their lease"),
    ("fedmeta_upload_slots_in_use", "gauge", "", "update payloads being received now"),
    ("fedmeta_upload_slots", "gauge", "", "update payloads received at once at most (--max-concurrent-uploads)"),
    ("fedmeta_train_metric", "gauge", "metric", "the last training round's mean over its clients: loss_post "
                                                "(the meta-loss), loss_pre, compute_s"),
    ("fedmeta_validations_total", "counter", "", "validations (--eval-every) closed by this process"),
    ("fedmeta_validation_metric", "gauge", "metric", "the last validation: loss_post, loss_pre, and for "
                                                     "classification accuracy_post, accuracy_pre"),
    ("process_resident_memory_bytes", "gauge", "", "the coordinator's resident memory (and the other process_* "
                                                   "metrics of prometheus-client)"),
)


class Coordinator(Protocol):
    """What the exporter reads of server.coordinator.Coordinator."""

    telemetry: Telemetry
    config: Any

    @property
    def next_round(self) -> int: ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def bytes_received(self) -> int: ...

    def live_clients(self) -> int: ...

    def uploads_in_use(self) -> int: ...


def require() -> None:
    """RuntimeError with the pip command unless prometheus-client is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--metrics-port needs prometheus-client: {INSTALL}") from None


class _Collector:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        helps = {name: text for name, _, _, text in METRICS}

        def counter(name: str, value: float) -> Any:
            return CounterMetricFamily(name.removesuffix("_total"), helps[name], value=value)

        def gauge(name: str, value: float) -> Any:
            return GaugeMetricFamily(name, helps[name], value=value)

        s = self.c.telemetry.snapshot()
        yield counter("fedmeta_rounds_completed_total", s.rounds_completed)
        yield gauge("fedmeta_next_round", self.c.next_round)
        yield gauge("fedmeta_rounds", self.c.config.rounds)
        bounds = [f"{b:g}" for b in ROUND_BUCKETS_S] + ["+Inf"]
        yield HistogramMetricFamily("fedmeta_round_duration_seconds", helps["fedmeta_round_duration_seconds"],
                                    buckets=list(zip(bounds, s.round_buckets)), sum_value=s.round_sum_s)
        accepted = CounterMetricFamily("fedmeta_updates_accepted", helps["fedmeta_updates_accepted_total"],
                                       labels=["kind"])
        for kind in KINDS:
            accepted.add_metric([kind], s.accepted[kind])
        yield accepted
        refused = CounterMetricFamily("fedmeta_updates_refused", helps["fedmeta_updates_refused_total"],
                                      labels=["reason"])
        for reason in REASONS:
            refused.add_metric([reason], s.refused[reason])
        yield refused
        yield counter("fedmeta_updates_carried_total", s.carried)
        yield counter("fedmeta_bytes_sent_total", self.c.bytes_sent)
        yield counter("fedmeta_bytes_received_total", self.c.bytes_received)
        yield gauge("fedmeta_clients_live", self.c.live_clients())
        yield gauge("fedmeta_upload_slots_in_use", self.c.uploads_in_use())
        yield gauge("fedmeta_upload_slots", self.c.config.max_concurrent_uploads)
        for name, values in (("fedmeta_train_metric", s.train), ("fedmeta_validation_metric", s.validation)):
            family = GaugeMetricFamily(name, helps[name], labels=["metric"])
            for metric, value in sorted(values.items()):
                family.add_metric([metric], value)
            yield family
        yield counter("fedmeta_validations_total", s.validations)


class _Handler(WSGIRequestHandler):
    timeout = IDLE_S  # socket timeout: a connection that sends nothing for IDLE_S is closed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them; a connection over it is closed at once."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """The /metrics endpoint on host:port (0 picks a free port; .port says which), serving from a thread."""

    def __init__(self, coordinator: Coordinator, host: str, port: int) -> None:
        require()
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(_Collector(coordinator))  # type: ignore[arg-type]

        class Server(_BoundedServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self.httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Handler)
        except OSError as exc:
            raise OSError(f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = int(self.httpd.server_port)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedmeta-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
