"""A coordinator process for big_model_round.py: Reptile with a ~11M-parameter MLP, no local clients.

Builds the ServerConfig with server.config.build, swaps the run's model for an MLP
1-H-H-1 (H=3300: 10,903,201 parameters, 43.6 MB float32), serves on 127.0.0.1:0,
prints `listening on 127.0.0.1:PORT`, and exits once the run is finished and the
clients were told so. Its last stdout line is JSON with its own RSS readings.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import psutil

_PROC = psutil.Process()
_RSS_START = _PROC.memory_info().rss

import dataclasses  # noqa: E402

import torch  # noqa: E402

from fedmeta.common.models import ModelSpec  # noqa: E402
from fedmeta.server.config import build  # noqa: E402
from fedmeta.server.coordinator import Coordinator  # noqa: E402
from fedmeta.server.grpc_server import create_server  # noqa: E402

MB = 1e6


def rss() -> int:
    return _PROC.memory_info().rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--hidden", type=int, default=3300, help="width H of the MLP 1-H-H-1")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-concurrent-uploads", type=int, default=2)
    parser.add_argument("--encoding", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_import = rss()
    config = build({
        "algorithm": "reptile", "rounds": args.rounds, "clients_per_round": args.clients,
        "min_clients": args.clients, "port": 0, "run_dir": args.run_dir, "checkpoint_every": 10**9,
        "local_clients": 0, "tasks_per_client": 1, "eval_tasks_per_client": 1, "eval_queries": 5,
        "eval_steps": 1, "max_concurrent_uploads": args.max_concurrent_uploads, "encoding": args.encoding,
        "round_deadline_s": 120.0, "poll_timeout_s": 10.0,
    })
    model = ModelSpec("mlp", {"in_features": 1, "hidden": [args.hidden, args.hidden], "out_features": 1})
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, model=model))
    coordinator = Coordinator(config)
    rss_coordinator = rss()
    server, port = create_server(config, coordinator)
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    coordinator.start()
    try:
        while not coordinator.finished.wait(0.2):
            pass
        deadline = time.monotonic() + 2 * config.run.poll_timeout_s
        while coordinator.clients_pending_finish() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        coordinator.stop()
        server.stop(grace=1.0).wait(5)
    print(json.dumps({
        "parameters": coordinator.layout.numel,
        "payload_bytes": coordinator.layout.numel * 4,
        "rss_start_mb": _RSS_START / MB,
        "rss_after_import_mb": rss_import / MB,
        "rss_after_coordinator_mb": rss_coordinator / MB,
        "rss_at_end_mb": rss() / MB,
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "torch_threads": torch.get_num_threads(),
        "summary_wall_s": coordinator.summary["wall_s"] if coordinator.summary else None,
        "finished": coordinator.summary is not None,
    }), flush=True)
    return 0 if coordinator.summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())
