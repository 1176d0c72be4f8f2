"""Run state (server/runstate.py): the resume check."""

from __future__ import annotations

import re

import pytest

from server.runstate import RESUME_KEYS, check_resumable


def test_resuming_needs_the_same_settings() -> None:
    current = {k: 1 for k in RESUME_KEYS}
    check_resumable(dict(current), current, "runs/x")
    with pytest.raises(ValueError, match=re.escape("inner_lr: checkpoint 2, now 1")):
        check_resumable(current | {"inner_lr": 2}, current, "runs/x")
    old = {k: v for k, v in current.items() if k not in ("eval_every", "eval_ways")}  # before --eval-every
    check_resumable(old, current | {"eval_every": 0}, "runs/x")
