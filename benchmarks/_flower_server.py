"""A Flower server process for vs_flower.py: FedAvg over Flower's gRPC transport, ~11M float32 parameters.

Runs in an environment with flwr (benchmarks/requirements-flower.txt); it imports nothing from
fedmeta. `flwr.server.start_server` (Flower's gRPC-bidi transport, deprecated since 1.13 but
still shipped in 1.x) on 127.0.0.1:--port, FedAvg with fraction_fit=1, min_fit_clients =
min_available_clients = --clients, no evaluation, initial parameters = the arrays of an MLP
1-H-H-1 (H=3300: 10,903,201 float32 parameters, 43.6 MB, the shapes of _big_coordinator.py's
model), --rounds rounds.

Round time: from the strategy's configure_fit to the end of its aggregate_fit (the clients' fit
results have all arrived and been averaged). Round 1 includes waiting for the clients to connect.
Prints `listening on 127.0.0.1:PORT` once the gRPC server is up (Flower asks the strategy for the
initial parameters right after starting it); the last stdout line is JSON with the timings and
this process's own RSS readings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import psutil

_PROC = psutil.Process()
_RSS_START = _PROC.memory_info().rss
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402

import flwr  # noqa: E402
from flwr.common import ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerConfig, start_server  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

MB = 1e6


def mlp_arrays(hidden: int, seed: int = 0) -> list[np.ndarray]:
    """Weights and biases of an MLP 1-H-H-1 (PyTorch Linear shapes: weight [out, in], bias [out])."""
    rng = np.random.default_rng(seed)
    shapes = [(hidden, 1), (hidden,), (hidden, hidden), (hidden,), (1, hidden), (1,)]
    return [(0.01 * rng.standard_normal(s, dtype=np.float32)).astype(np.float32) for s in shapes]


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's configure_fit starts and its aggregate_fit ends."""

    def __init__(self, *, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port = port
        self.rounds: dict[int, dict[str, float]] = {}
        self.rss_before_rounds = 0

    def initialize_parameters(self, client_manager: Any) -> Any:
        self.rss_before_rounds = _PROC.memory_info().rss
        print(f"listening on 127.0.0.1:{self.port}", flush=True)
        return super().initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        start = time.perf_counter()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.rounds[server_round] = {"start": start, "sampled": time.perf_counter()}
        return instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        out = super().aggregate_fit(server_round, results, failures)
        r = self.rounds[server_round]
        r["end"] = time.perf_counter()
        r["results"], r["failures"] = len(results), len(failures)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=3300, help="width H of the MLP 1-H-H-1")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-message-mb", type=int, default=512, help="grpc_max_message_length in MiB")
    args = parser.parse_args()
    rss_import = _PROC.memory_info().rss
    arrays = mlp_arrays(args.hidden)
    numel = sum(a.size for a in arrays)
    strategy = TimedFedAvg(port=args.port, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                           min_evaluate_clients=args.clients, min_available_clients=args.clients,
                           initial_parameters=ndarrays_to_parameters(arrays))
    del arrays
    started = time.perf_counter()
    start_server(server_address=f"127.0.0.1:{args.port}", config=ServerConfig(num_rounds=args.rounds),
                 strategy=strategy, grpc_max_message_length=args.max_message_mb << 20)
    wall = time.perf_counter() - started
    rounds = [dict(round=k, round_s=v["end"] - v["start"], sample_wait_s=v["sampled"] - v["start"],
                   results=v["results"], failures=v["failures"])
              for k, v in sorted(strategy.rounds.items()) if "end" in v]
    print(json.dumps({
        "flwr": flwr.__version__,
        "parameters": int(numel),
        "payload_bytes": int(numel) * 4,
        "rounds": rounds,
        "wall_s": wall,
        "rss_start_mb": _RSS_START / MB,
        "rss_after_import_mb": rss_import / MB,
        "rss_before_rounds_mb": strategy.rss_before_rounds / MB,
        "rss_at_end_mb": _PROC.memory_info().rss / MB,
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "finished": len(rounds) == args.rounds and all(r["failures"] == 0 for r in rounds),
    }), flush=True)
    return 0 if len(rounds) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
