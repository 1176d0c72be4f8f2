"""What a status snapshot costs the coordinator: time under its lock, time in all, response size.

Registers --clients clients (default 10000, the --max-clients default) in an in-process
Coordinator (no sockets), records 200 rounds of history, then times server/status.py's
snapshot() --repeat times: the part under the coordinator's lock is timed by wrapping the
lock. Prints one JSON line and writes it to --out.

    python benchmarks/status_snapshot.py --clients 10000 --repeat 20 --out /tmp/status_snapshot.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format

from fedmeta.server.config import build
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.status import snapshot


class TimedCondition:
    """The coordinator's condition variable, timing how long each `with` holds it."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.held: list[float] = []

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.inner.__enter__()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self.held.append(time.perf_counter() - self._t)
        return self.inner.__exit__(*exc)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = Coordinator(build({"run_dir": f"{tmp}/run", "rounds": 1000, "max_clients": max(args.clients, 1)}))
        for i in range(args.clients):
            c.join(f"client-{i:06d}", device="cpu", num_tasks=8)
        for r in range(200):
            c.stats.observe({"round": r, "meta_loss": 1.0 / (r + 1), "clients_answered": 4, "round_s": 0.1})
        timed = TimedCondition(c._cond)
        c._cond = timed  # type: ignore[assignment]
        total, sizes = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            s = snapshot(c, limit=100)
            body = json_format.MessageToJson(s, preserving_proto_field_name=True, indent=None)
            total.append(time.perf_counter() - t)
            sizes.append((s.ByteSize(), len(body)))
    result = {"benchmark": "status_snapshot", "clients": args.clients, "repeat": args.repeat, "page": 100,
              "lock_held_ms_median": 1e3 * statistics.median(timed.held),
              "lock_held_ms_max": 1e3 * max(timed.held),
              "snapshot_and_json_ms_median": 1e3 * statistics.median(total),
              "proto_bytes": sizes[0][0], "json_bytes": sizes[0][1]}
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
