"""Log lines for people (text) or for log shippers (one JSON object per line).

`--log-format json` writes, per record, one object with the keys of LOG_KEYS: time (UTC,
ISO 8601 with milliseconds), level, logger, event, round, client, message (and exception,
with its traceback, when there is one). A call site names the event, the round and the client
with `extra=fields(...)`; a key the site does not name is null, except event ("log") and, in
a client process, client (its own id). Text that came from peers is clipped to one printable
line where it is logged (common/textsafe.py); JSON-escaping keeps a line one object, and the
clipping keeps a terminal that shows it safe.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
LOG_KEYS = ("time", "level", "logger", "event", "round", "client", "message")
DEFAULT_EVENT = "log"


def fields(*, event: str, round: int | None = None, client: str | None = None) -> dict[str, Any]:
    """The `extra=` of a log call that names its event (and its round and client, where it has them)."""
    return {"event": event, "round": round, "client": client}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (LOG_KEYS, then "exception" if any); never more than one line."""

    def __init__(self, *, client: str | None = None) -> None:
        super().__init__()
        self.client = client

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or DEFAULT_EVENT,
            "round": getattr(record, "round", None),
            "client": getattr(record, "client", None) or self.client,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        # ensure_ascii: control characters and non-ASCII are escaped, so one record is one line.
        return json.dumps(out, ensure_ascii=True, default=str)


def setup_logging(level: str, log_format: str = "text", *, client: str | None = None) -> None:
    """Log to stderr at `level` in `log_format` (text or json); client: a client process's own id."""
    if log_format not in FORMATS:
        raise ValueError(f"--log-format: expected one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(client=client))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
