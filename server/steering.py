"""The operator's actions on a live run (the Admin service calls them): pause, resume, revoke,
change the round deadline or the quorum, stop after the open round.

Each action takes the coordinator's lock for a few assignments, is logged, and is appended
to the run directory's admin.jsonl ({time, action, arguments, result}). A revocation is
also written to revoked.json at once (atomically) and into every later checkpoint, so a
coordinator restarted at any moment keeps the client revoked. New values are checked
like their flags (server/config.py's declarations); refused ones raise ValueError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from fedmeta.common.config import check_client_id
from fedmeta.common.settings import check_value
from fedmeta.common.textsafe import clip
from fedmeta.server.registry import Registry
from fedmeta.server.rounds import Policy, RoundsState

log = logging.getLogger("fedmeta.admin")
MAX_REVOKED = 100_000
REVOKED_FILE = "revoked.json"
ADMIN_LOG = "admin.jsonl"


class Steered(Protocol):
    """What steering changes of server.coordinator.Coordinator."""

    _cond: threading.Condition
    policy: Policy
    registry: Registry
    state: RoundsState

    def clock(self) -> float: ...


def read_revoked(run_dir: Path) -> set[str]:
    """The ids in run_dir/revoked.json (empty if there is none); ValueError if it is unreadable."""
    path = run_dir / REVOKED_FILE
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text())
        ids = data["revoked"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError("'revoked' is not a list of client ids")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--run-dir: {path} is unreadable ({exc}); fix or restore it: it lists revoked clients") from None
    return set(ids[:MAX_REVOKED])


class Steering:
    """Pause, stop and revocation state, and the actions that change it (all under c._cond)."""

    def __init__(self, c: Steered, run_dir: Path) -> None:
        self.c = c
        self.run_dir = run_dir
        self.paused = False
        self.stop_requested = False
        self.stopped = threading.Event()  # set once the clean stop's checkpoint and export are written
        self._file_lock = threading.Lock()

    # ---- the actions ------------------------------------------------------------------------
    def pause(self) -> str:
        with self.c._cond:
            already = self.paused
            self.paused = True
            rnd = self.c.state.round
        result = ("already paused" if already else
                  f"paused: no new round opens{f' after round {rnd.index} closes' if rnd is not None else ''}")
        return self._done("pause", {}, result)

    def resume(self) -> str:
        with self.c._cond:
            was = self.paused
            self.paused = False
            self.c.state.waiting_since = self.c.clock()  # the pause is not time spent waiting for clients
            self.c._cond.notify_all()
        return self._done("resume", {}, "sampling resumed" if was else "was not paused")

    def revoke(self, client_id: str) -> str:
        check_client_id(client_id)
        with self.c._cond:
            registry = self.c.registry
            if client_id in registry.revoked:
                return self._done("revoke", {"client_id": client_id}, f"client {client_id!r} was already revoked")
            if len(registry.revoked) >= MAX_REVOKED:
                raise ValueError(f"revoke: {MAX_REVOKED} clients are revoked already, the most this coordinator keeps")
            registry.revoke(client_id)
            rnd = self.c.state.round
            dropped = rnd is not None and client_id in rnd.sampled and client_id not in rnd.answered
            if rnd is not None and dropped:
                rnd.sampled.discard(client_id)
                rnd.dropped.add(client_id)
            self.c._cond.notify_all()
        self._write_revoked()
        detail = f"; dropped from round {rnd.index}" if dropped and rnd is not None else ""
        return self._done("revoke", {"client_id": client_id},
                          f"client {client_id!r} revoked: its calls and updates are refused{detail}")

    def set_deadline(self, seconds: float) -> str:
        from fedmeta.server.config import OPTIONS

        value = check_value(next(o for o in OPTIONS if o.name == "round_deadline_s"), float(seconds))
        with self.c._cond:
            old = self.c.policy.round_deadline_s
            self.c.policy = dataclasses.replace(self.c.policy, round_deadline_s=value)
            self.c._cond.notify_all()
        return self._done("set-deadline", {"round_deadline_s": value},
                          f"round deadline {old:g} s -> {value:g} s from the next round on")

    def set_quorum(self, min_clients: int) -> str:
        from fedmeta.server.config import OPTIONS

        value = check_value(next(o for o in OPTIONS if o.name == "min_clients"), int(min_clients))
        with self.c._cond:
            per_round = self.c.policy.clients_per_round
            if value > per_round:
                raise ValueError(f"--min-clients: expected at most --clients-per-round ({per_round}), got {value}")
            old = self.c.policy.min_clients
            self.c.policy = dataclasses.replace(self.c.policy, min_clients=value)
            self.c._cond.notify_all()
        return self._done("set-quorum", {"min_clients": value}, f"quorum {old} -> {value} clients from now on")

    def stop_after_round(self) -> str:
        with self.c._cond:
            self.stop_requested = True
            rnd = self.c.state.round
            self.c._cond.notify_all()
        when = f"after round {rnd.index} closes" if rnd is not None else "now (no round is open)"
        return self._done("stop", {}, f"stopping {when}: a checkpoint and model/ are written, then the coordinator "
                                      "exits; restart it with the same --run-dir to resume")

    # ---- records ------------------------------------------------------------------------------
    def refused(self, action: str, arguments: dict[str, Any], error: str) -> None:
        self._append(action, arguments, f"refused: {error}")

    def _done(self, action: str, arguments: dict[str, Any], result: str) -> str:
        log.warning("admin: %s %s: %s", action, json.dumps(arguments), result)
        self._append(action, arguments, result)
        return result

    def _append(self, action: str, arguments: dict[str, Any], result: str) -> None:
        entry = {"time": time.time(), "action": action, "arguments": arguments, "result": clip(result, 500)}
        with self._file_lock, open(self.run_dir / ADMIN_LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _write_revoked(self) -> None:
        path = self.run_dir / REVOKED_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        with self._file_lock:  # the newest set is written last, whatever order revocations race in
            with self.c._cond:
                revoked = sorted(self.c.registry.revoked)
            with open(tmp, "w") as f:
                json.dump({"revoked": revoked}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
