"""fedmeta-server: run the coordinator (and, with --local-clients N, N client processes)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fedmeta.common.cli import OneLineErrorParser, add_log_format_argument, setup_logging
from fedmeta.common.logformat import fields
from fedmeta.server import local, trackers
from fedmeta.server.config import ServerConfig, add_arguments, describe, resolve
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.grpc_server import Server, create_server
from fedmeta.server.memory import fix_mmap_threshold, freeze_startup_objects

log = logging.getLogger("fedmeta.server")


class Shutdown(Exception):
    """SIGTERM or SIGINT."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fedmeta-server",
        description=(
            "Coordinate a federated meta-learning run: broadcast meta-parameters, aggregate clients' "
            "meta-gradients or deltas, checkpoint every round, evaluate few-shot adaptation at the end. "
            "With no flags but --local-clients N it runs second-order MAML on sinusoid regression with "
            "N client processes on 127.0.0.1."
        ),
    )
    add_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (default: info)")
    add_log_format_argument(parser)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar; log the first and last round and every 10%% of rounds (at most one "
                             "line per 5 s), as when stderr is not a terminal")
    return parser


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # One signal starts an orderly stop; a second one during it must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Shutdown(signal.Signals(signum).name)


# Without a bar (a pipe, compose logs, CI, nohup, --no-progress, --log-format json) a round's line is
# written for the first and last round, else at most one per MIN_LINE_S, when 10% of the rounds
# passed since the last line or HEARTBEAT_S did (a slow run still says it is alive).
MIN_LINE_S = 5.0
HEARTBEAT_S = 300.0


class Progress:
    """A progress bar over rounds with meta-loss, answers and round time, plus periodic log lines."""

    def __init__(self, config: ServerConfig, start: int, *, bar: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = config.rounds
        self.clients = config.clients_per_round
        self.every = max(1, config.rounds // 10)
        self.bar = tqdm(total=config.rounds, initial=start, unit="round", dynamic_ncols=True, disable=not bar,
                        file=sys.stderr, mininterval=0.25)
        self.use_bar = bar
        self.clock = clock
        self.first = start + 1
        self._last_r: int | None = None  # the round of the last line
        self._last_t = 0.0
        self._val_t = -math.inf
        self.val = ""  # the last validation, shown on the progress line ("*": the best so far)

    def due(self, r: int) -> bool:
        """Whether round r (1-based) gets a log line."""
        if self.use_bar:
            return r % self.every == 0 or r == self.total
        if self._last_r is None or r == self.total or r == self.first:
            return True
        since = self.clock() - self._last_t
        return since >= MIN_LINE_S and (r - self._last_r >= self.every or since >= HEARTBEAT_S)

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("event") == "validation":
            self._validation(record)
            return
        r = record["round"] + 1
        loss = record["meta_loss"]
        val = f"  {self.val}" if self.val else ""
        if record.get("staleness_max") is not None:  # --schedule buffered: the staleness of the step's updates
            val += f"  staleness {record['staleness_mean']:.1f}/{record['staleness_max']}"
        text = (f"round {r}/{self.total}  meta-loss {loss:.3f}{val}  clients {record['clients_answered']}/"
                f"{record['clients_sampled']}  round {record['round_s'] * 1e3:.0f} ms")
        if self.use_bar:
            self.bar.set_postfix_str(f"meta-loss {loss:.3f}{val}  clients {record['clients_answered']}/"
                                     f"{record['clients_sampled']}  {record['round_s'] * 1e3:.0f} ms/round",
                                     refresh=False)
            self.bar.update(1)
        if self.due(r):
            self._last_r, self._last_t = r, self.clock()
            log.info(text, extra=fields(event="round", round=record["round"]))

    def _validation(self, record: dict[str, Any]) -> None:
        value, ci = record.get("val_value"), record.get("val_ci95")
        shown = "nan" if value is None else f"{value:.3f}"
        self.val = f"val {record['val_metric']} {shown}{'*' if record.get('best') else ''}"
        pm = f" ± {ci:.3f}" if isinstance(ci, float) else ""
        last = record["rounds_trained"] == self.total
        if not (self.use_bar or last or self.clock() - self._val_t >= MIN_LINE_S):
            return  # on a pipe: at most one validation line per MIN_LINE_S, and always the last one
        self._val_t = self.clock()
        log.info("validation after %d rounds on %d tasks: %s %s%s%s", record["rounds_trained"], record["val_tasks"],
                 record["val_metric"], shown, pm, "  (best so far: exported to model-best/)" if record.get("best") else "",
                 extra=fields(event="validation", round=record["after_round"]))

    def close(self) -> None:
        self.bar.close()


def print_summary(summary: dict[str, Any], run_dir: str) -> None:
    ev = summary["eval"]
    mb = 1e6
    ci = ev.get("ci95")
    pm = f" ± {ci:.3f}" if isinstance(ci, float) and ci == ci else ""
    setting = f"{ev['ways']}-way {ev['shots']}-shot" if "ways" in ev else f"{ev['shots']}-shot"
    if ev.get("train_ways") not in (None, ev.get("ways")):
        setting += f", trained {ev['train_ways']}-way"
    steps = f"{ev['steps']} steps" if ev["steps"] else "no adaptation steps"
    eval_s = summary.get("eval_s")
    timing = f" ({eval_s:.1f} s of it evaluating)" if isinstance(eval_s, float) else ""
    lines = [
        "",
        f"fedmeta run {summary['run_id']} finished: {summary['algorithm']} on {summary['task']}, "
        f"{summary['rounds_completed']} rounds, {summary['clients_seen']} clients, {summary['wall_s']:.1f} s{timing}, "
        f"{summary['bytes_sent'] / mb:.1f} MB sent, {summary['bytes_received'] / mb:.1f} MB received",
        f"Few-shot adaptation on {ev['tasks']} held-out tasks ({setting}, {steps}, "
        f"{ev['queries']} queries{' per class' if 'ways' in ev else ''}):",
        f"  {'metric':<12}{'before':>10}{'after':>10}",
    ]
    if ev.get("accuracy_post") is not None:
        lines.append(f"  {'accuracy':<12}{ev['accuracy_pre']:>10.3f}{ev['accuracy_post']:>10.3f}{pm}  (95% CI)")
        lines.append(f"  {'loss':<12}{ev['loss_pre']:>10.3f}{ev['loss_post']:>10.3f}")
    else:
        name = "MSE" if summary["task"] == "sinusoid" else "loss"
        lines.append(f"  {name:<12}{ev['loss_pre']:>10.3f}{ev['loss_post']:>10.3f}{pm}  (95% CI)")
    by_shots = ev.get("by_shots") or {}
    if len(by_shots) > 1:
        lines.append("  after adaptation with " + ", ".join(f"{k}-shot {v:.3f}" for k, v in by_shots.items())
                     + ": what a new data holder gains from labelling more examples")
    best = summary.get("best")
    if best:
        lines.append(f"Best validation {best['metric']} {best['value']:.3f} after round {best['rounds_trained']}: "
                     "model-best/ (the last round's θ is in model/)")
    if ev.get("transductive_bn"):
        lines.append("  (batch norm uses each task's batch statistics: transductive evaluation)")
    lines.append(f"Run directory: {run_dir}  (summary.json, metrics.jsonl, model/, checkpoint/, logs/)")
    print("\n".join(lines), flush=True)


def open_trackers(config: ServerConfig, next_round: int) -> list[trackers.Sink]:
    return trackers.open_trackers(tensorboard=config.tensorboard, mlflow_uri=config.mlflow_uri,
                                  run_id=config.run.run_id, params=describe(config), next_round=next_round)


def run_centralized(config: ServerConfig, *, progress_bar: bool) -> int:
    from fedmeta.server import centralized_run

    progress = Progress(config, 0, bar=progress_bar)
    sinks = open_trackers(config, 0)

    def on_round(record: dict[str, Any]) -> None:
        progress(record)
        for sink in sinks:
            sink.record(record)

    try:
        with logging_redirect_tqdm():
            summary = centralized_run.run(config, on_round=on_round)
        for sink in sinks:
            sink.summary(summary)
    finally:
        for sink in sinks:
            sink.close()
    progress.close()
    print_summary(summary, str(config.run_dir))
    from fedmeta.server.plots import plots_after_run

    plots_after_run(config.run_dir)
    return 0


def shutdown(server: Server, coordinator: Coordinator, *, grace_s: float = 2.0) -> None:
    """Stop in the order that leaves nothing half-done and no thread racing interpreter exit:
    1. the coordinator stops opening rounds, and its long-polls answer UNAVAILABLE (clients retry);
    2. the gRPC server stops accepting calls, lets running ones end for grace_s, cancels the rest,
       and this waits until it has stopped (so no RPC reaches a thread pool being torn down);
    3. the round thread is joined: a checkpoint it is writing is completed, never cut."""
    coordinator.begin_stop()
    server.stop(grace=grace_s).wait()
    coordinator.stop()


def serve(config: ServerConfig, *, progress_bar: bool, log_format: str = "text") -> int:
    progress: Progress | None = None
    metrics = None

    def on_round(record: dict[str, Any]) -> None:
        if progress is not None:
            progress(record)

    fix_mmap_threshold(config.malloc_mmap_threshold)
    coordinator = Coordinator(config, on_round=on_round)
    coordinator.runstate.sinks.extend(open_trackers(config, coordinator.next_round))
    if config.local_clients:
        torch.set_num_threads(1)  # leave the cores to the client processes
    server, port = create_server(config, coordinator)
    procs: list = []
    board = None
    try:
        server.start()
        print(f"listening on {config.host}:{port}", flush=True)
        if config.metrics_port is not None:
            from fedmeta.server.prometheus import MetricsServer

            metrics = MetricsServer(coordinator, config.metrics_host, config.metrics_port)
            print(f"metrics on http://{metrics.host}:{metrics.port}/metrics", flush=True)
        if config.dashboard_port is not None:
            from fedmeta.server.dashboard import start_dashboard

            board = start_dashboard(config, coordinator)
            print(f"dashboard on {board.url}", flush=True)
        log.info("run %s: %s on %s, %d rounds, %d clients per round; run directory %s", config.run.run_id,
                 config.run.algorithm, config.run.task, config.rounds, config.clients_per_round, config.run_dir,
                 extra=fields(event="run_started"))
        progress = Progress(config, coordinator.next_round, bar=progress_bar)
        with logging_redirect_tqdm():
            log.debug("gc: %d start-up objects frozen", freeze_startup_objects())
            coordinator.start()
            if config.local_clients:
                procs = local.spawn(config.local_clients, port, config.run_dir / "logs", tls_ca=config.tls_ca,
                                    data_dir=config.data_dir, device=config.local_device, log_format=log_format)
                log.info("started %d local client processes (logs in %s)", len(procs), config.run_dir / "logs")
            stopped = coordinator.steering.stopped
            while not coordinator.finished.wait(0.5) and not coordinator.failed.is_set() and not stopped.is_set():
                if procs and all(p.poll() is not None for p in procs):
                    codes = sorted({p.returncode for p in procs})
                    raise RuntimeError(f"every local client exited (codes {codes}) before the run finished; "
                                       f"local-0 said: {local.last_error(config.run_dir / 'logs', 0)!r} "
                                       f"(logs in {config.run_dir / 'logs'})")
            progress.close()
        deadline = time.monotonic() + 2 * config.run.poll_timeout_s
        while coordinator.finished.is_set() and coordinator.clients_pending_finish() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if progress is not None:
            progress.close()
        if board is not None:
            board.close()
        # a finished run: thousands of FINISHED answers and Leave calls may still be in flight
        shutdown(server, coordinator, grace_s=10.0 if coordinator.finished.is_set() else 2.0)
        local.stop(procs, timeout_s=10.0 if coordinator.finished.is_set() else 0.0)
        coordinator.runstate.close_sinks()
        if metrics is not None:
            metrics.close()
    if coordinator.steering.stopped.is_set() and coordinator.summary is None:
        print(f"fedmeta run {config.run.run_id} stopped by its operator after {coordinator.next_round} of "
              f"{config.rounds} rounds: checkpoint and model/ in {config.run_dir}; run the same command to resume",
              flush=True)
        return 0
    if coordinator.summary is None:
        raise RuntimeError(f"the run stopped without finishing: {coordinator.error or 'see the log above'}")
    print_summary(coordinator.summary, str(config.run_dir))
    from fedmeta.server.plots import plots_after_run  # draws only when matplotlib is installed

    plots_after_run(config.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level, args.log_format)
    try:
        if config.metrics_port is not None:
            from fedmeta.server.prometheus import require

            require()
        trackers.check_installed(tensorboard=config.tensorboard, mlflow_uri=config.mlflow_uri)
    except RuntimeError as exc:
        print(f"fedmeta-server: error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if config.download and config.data_dir is not None:
            from pathlib import Path

            from fedmeta.common.tasks.omniglot_download import download

            download(Path(config.data_dir))
        # A bar only on a terminal, and never between JSON lines.
        bar = not args.no_progress and args.log_format == "text" and sys.stderr.isatty()
        if config.mode == "centralized":
            return run_centralized(config, progress_bar=bar)
        return serve(config, progress_bar=bar, log_format=args.log_format)
    except Shutdown as exc:
        log.warning("%s received: stopped; the last checkpoint in %s resumes the run", exc, config.run_dir)
        return 130 if str(exc) == "SIGINT" else 0
    except ValueError as exc:
        parser.error(str(exc))
    except (OSError, RuntimeError) as exc:
        print(f"fedmeta-server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
