"""Why the coordinator refused a call, as a machine-readable reason (the RefusalReason contract).

The coordinator sends the reason with the status code as the trailing metadata entry
`fedmeta-reason: NAME` (protos/fedmeta/v1/coordinator.proto, enum RefusalReason, without
its prefix). The status message is for people; clients decide on the reason alone, and on
the status code alone when the entry is missing (an older coordinator, a proxy).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

REASON_KEY = "fedmeta-reason"


class Reason(Enum):
    """RefusalReason without its REFUSAL_REASON_ prefix (tests/unit/test_refusal.py checks the two agree)."""

    NOT_JOINED = "NOT_JOINED"
    WRONG_RUN = "WRONG_RUN"
    ROUND_CLOSED = "ROUND_CLOSED"
    NOT_SAMPLED = "NOT_SAMPLED"
    STALE_VERSION = "STALE_VERSION"
    WRONG_KIND = "WRONG_KIND"
    BAD_WEIGHT = "BAD_WEIGHT"
    BAD_METRICS = "BAD_METRICS"
    BAD_TENSORS = "BAD_TENSORS"
    BAD_VALUES = "BAD_VALUES"
    BAD_STREAM = "BAD_STREAM"
    TOO_LARGE = "TOO_LARGE"
    BUSY = "BUSY"
    REGISTRY_FULL = "REGISTRY_FULL"
    STOPPING = "STOPPING"
    BAD_CLIENT_ID = "BAD_CLIENT_ID"
    NOT_ALLOWED = "NOT_ALLOWED"
    BAD_PROTOCOL = "BAD_PROTOCOL"


# What a client does on each reason: join again, or drop the work and ask for new work.
REJOIN = frozenset({Reason.NOT_JOINED, Reason.WRONG_RUN})
NEW_WORK = frozenset({Reason.ROUND_CLOSED, Reason.NOT_SAMPLED, Reason.STALE_VERSION})


def reason_metadata(reason: Reason) -> tuple[tuple[str, str]]:
    """The trailing metadata that carries `reason`."""
    return ((REASON_KEY, reason.value),)


def reason_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Reason | None:
    """The reason in a call's trailing metadata; None if absent or not one this release knows."""
    for key, value in metadata or ():
        if key == REASON_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            try:
                return Reason(text)
            except ValueError:
                return None
    return None
