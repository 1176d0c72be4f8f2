"""What the status snapshot reports beyond the registry: per-client counters, refusals, recent records.

Thread-safe with its own small lock (the service counts bytes and refusals outside the
coordinator's lock). Bounded: a client gets an entry only when it joins (the registry
admits at most --max-clients), at most 2 x max_clients entries are kept (the oldest
forgotten first), refusals are counted per reason (a fixed set), ids without an entry
count in the totals only, and the last HISTORY rounds and validations are kept.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeta.common.textsafe import clip

HISTORY = 200
PACE_ROUNDS = 20  # rounds per minute over the last this many training rounds
MESSAGE_CHARS = 200
TAIL_BYTES = 256 * 1024  # a resumed run's dashboard shows the rounds before the restart from this much of metrics.jsonl


@dataclass
class Refusals:
    """Per reason: [count, last message]."""

    by_reason: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        entry = self.by_reason.setdefault(reason, [0, ""])
        entry[0] += 1
        entry[1] = clip(message, MESSAGE_CHARS)

    def copy(self) -> list[tuple[str, int, str]]:
        return sorted((r, int(e[0]), str(e[1])) for r, e in self.by_reason.items())


@dataclass
class ClientCounters:
    compute_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    refusals: Refusals = field(default_factory=Refusals)


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


class ClientStats:
    """Counters per joined client, refusal totals, and the last rounds' and validations' records."""

    def __init__(self, max_clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = 2 * max_clients
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, ClientCounters] = OrderedDict()
        self.refusals = Refusals()
        self.rounds: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.validations: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._closed_at: deque[float] = deque(maxlen=PACE_ROUNDS)
        self.last_metrics: dict[str, float] = {}

    def joined(self, client_id: str) -> None:
        with self._lock:
            if client_id not in self._clients:
                self._clients[client_id] = ClientCounters()
                while len(self._clients) > self.cap:
                    self._clients.popitem(last=False)

    def count_bytes(self, client_id: str | None, *, sent: int = 0, received: int = 0) -> None:
        if not client_id:
            return
        with self._lock:
            c = self._clients.get(client_id)
            if c is not None:
                c.bytes_sent += sent
                c.bytes_received += received

    def trained(self, client_id: str, metrics: Mapping[str, float]) -> None:
        compute = metrics.get("compute_s")
        with self._lock:
            c = self._clients.get(client_id)
            if c is not None and isinstance(compute, float) and math.isfinite(compute):
                c.compute_s += compute

    def refused(self, client_id: str | None, reason: str, message: str) -> None:
        with self._lock:
            self.refusals.add(reason, message)
            c = self._clients.get(client_id) if client_id else None
            if c is not None:
                c.refusals.add(reason, message)

    def load(self, metrics_path: Path) -> None:
        """The last records of a resumed run's metrics.jsonl (its last TAIL_BYTES only)."""
        try:
            with open(metrics_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - TAIL_BYTES))
                lines = f.read().splitlines()[1 if size > TAIL_BYTES else 0:]
        except OSError:
            return
        for line in lines:
            try:
                record = json.loads(line)
                if isinstance(record, dict):
                    self.observe(record, live=False)
            except (ValueError, TypeError):
                continue  # a torn line, or a record this release does not know

    def observe(self, record: Mapping[str, Any], *, live: bool = True) -> None:
        """A metrics.jsonl record (a training round's or a validation's); live: closed just now."""
        with self._lock:
            if record.get("event") == "validation":
                self.validations.append({"rounds_trained": int(record.get("rounds_trained", 0)),
                                         "metric": str(record.get("val_metric", "")),
                                         "value": _finite(record.get("val_value")), "best": bool(record.get("best"))})
                return
            if "round" not in record:
                return
            self.rounds.append({"round": int(record["round"]), "meta_loss": _finite(record.get("meta_loss")),
                                "clients_answered": int(record.get("clients_answered", 0)),
                                "round_s": _finite(record.get("round_s"))})
            if live:
                self._closed_at.append(self.clock())
            self.last_metrics = {k: _finite(record.get(k)) for k in ("meta_loss", "loss_pre", "client_compute_s")
                                 if record.get(k) is not None}

    def pace(self) -> float:
        """Training rounds per minute over the last PACE_ROUNDS closes (0 until two closed)."""
        with self._lock:
            times = list(self._closed_at)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return 60.0 * (len(times) - 1) / (times[-1] - times[0])

    def copy(self, client_ids: list[str]) -> dict[str, Any]:
        """Everything the snapshot needs, copied (the caller serialises it without this lock)."""
        with self._lock:
            clients = {}
            for cid in client_ids:
                c = self._clients.get(cid)
                if c is not None:
                    clients[cid] = (c.compute_s, c.bytes_sent, c.bytes_received, c.refusals.copy())
            return {"clients": clients, "refusals": self.refusals.copy(), "rounds": list(self.rounds),
                    "validations": list(self.validations), "last_metrics": dict(self.last_metrics)}
