"""Peer-supplied text made safe to log or to quote back: bounded in length, one printable line."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

LIMIT = 200


def clip(text: object, limit: int = LIMIT) -> str:
    """At most about `limit` printable characters of str(text), then how long the whole was.

    Control characters (newlines, escapes) are written as \\xNN so that a peer cannot forge
    log lines; only the first `limit` characters are ever looked at, so a 1 MB name costs
    O(limit) here.
    """
    s = text if isinstance(text, str) else str(text)
    head = s[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                       for c in head)[:limit]
    return head if len(s) <= limit else f"{head}... ({len(s)} characters)"


class RateLimit:
    """At most `burst` log lines per key per `window_s` seconds; counts what it suppresses.

    allow(key) -> (log_it, suppressed_before): log_it is False once the key spent its burst
    in the current window; suppressed_before is how many lines the key's previous window
    suppressed (report it once, when the key's next window starts). At most `keys` keys are
    remembered (the oldest is forgotten first), so many distinct peers cost bounded memory.
    """

    def __init__(self, *, burst: int = 10, window_s: float = 60.0, keys: int = 4096) -> None:
        self.burst = burst
        self.window_s = window_s
        self.keys = keys
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, list[float]] = OrderedDict()  # key -> [start, lines, suppressed]

    def allow(self, key: str, now: float | None = None) -> tuple[bool, int]:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._windows.get(key)
            previous = 0
            if w is None or now - w[0] >= self.window_s:
                previous = int(w[2]) if w is not None else 0
                w = [now, 0.0, 0.0]
                self._windows[key] = w
                self._windows.move_to_end(key)
                while len(self._windows) > self.keys:
                    self._windows.popitem(last=False)
            if w[1] < self.burst:
                w[1] += 1
                return True, previous
            w[2] += 1
            return False, previous

    def suppressed(self, key: str) -> int:
        """How many lines the key's current window suppressed so far."""
        with self._lock:
            w = self._windows.get(key)
            return 0 if w is None else int(w[2])
