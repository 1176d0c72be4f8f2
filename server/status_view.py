"""The terminal view of a status snapshot (GetStatusResponse): plain text, 80 columns, sparklines.

Every string that a peer could have chosen (client ids, devices, refusal messages) goes
through common/textsafe.clip, so no escape sequence reaches the operator's terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedmeta.common.proto import admin_pb
from fedmeta.common.textsafe import clip

BLOCKS = "▁▂▃▄▅▆▇█"
WIDTH = 80


def sparkline(values: Sequence[float], width: int = 50) -> str:
    """One block character per value (the last `width`), scaled from the minimum to the maximum; NaN is a space."""
    vals = list(values)[-width:]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(BLOCKS[0 if span == 0 else min(len(BLOCKS) - 1, int((v - lo) / span * len(BLOCKS)))])
    return "".join(out)


def _duration(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def _safe(text: str, width: int) -> str:
    s = clip(text, width)
    return s if len(s) <= width else s[: width - 1] + "…"


def _number(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if math.isfinite(v) else "–"


def render(s: admin_pb.GetStatusResponse, *, width: int = WIDTH) -> str:
    r = s.run
    lines = [_safe(f"fedmeta run {r.run_id}: {r.algorithm} on {r.task}", width)]
    done, total = r.rounds_done, r.rounds_total
    bar_w = 20
    filled = int(bar_w * min(done, total) / total) if total else 0
    pace = f"{r.rounds_per_minute:.0f} rounds/min" if r.rounds_per_minute > 0 else "pace unknown"
    eta = "ETA " + (_duration(r.eta_s) if r.eta_s >= 0 else "unknown")
    lines.append(f"round {done}/{total} [{'█' * filled}{'·' * (bar_w - filled)}] {r.phase}, {pace}, {eta}"[:width])
    if r.open_round >= 0:
        opened = (f"open round {r.open_round}: {r.open_answered}/{r.open_sampled} answered, "
                  f"{_duration(r.open_round_age_s)} in")
    else:
        opened = "no round open" + (" (stop requested)" if r.stop_requested else "")
    lines.append(opened[:width])
    lines.append(f"clients {r.clients_live} live, {r.clients_registered} registered, {r.clients_revoked} revoked;"
                 f" quorum {r.min_clients}/{r.clients_per_round}, deadline {r.round_deadline_s:g} s"[:width])
    lines.append(f"traffic {_bytes(r.bytes_sent)} sent, {_bytes(r.bytes_received)} received; wall "
                 f"{_duration(r.wall_s)}; version {r.parameter_version[:12]}"[:width])
    losses = [p.meta_loss for p in s.rounds]
    if losses:
        last = losses[-1]
        lines.append(f"meta-loss  {sparkline(losses, 50):<50} {_number(last)}"[:width])
    vals = [v.value for v in s.validations]
    if vals:
        metric = _safe(s.validations[-1].metric, 8)
        lines.append(f"val {metric:<6} {sparkline(vals, 50):<50} {_number(vals[-1])}"[:width])
    if s.adaptation_curve:
        lines.append(f"adapted    {sparkline(list(s.adaptation_curve), 50):<50} "
                     f"{_number(s.eval_before)} -> {_number(s.eval_after)}"[:width])
    lines.append("")
    header = f"{'client':<18} {'state':<9} {'seen':>7} {'rounds':>6} {'compute':>8} {'sent':>9} {'recv':>9} {'refused':>7}"
    lines.append(header[:width])
    for c in s.clients:
        seen = _duration(c.last_seen_s) if c.last_seen_s >= 0 else "–"
        refused = sum(x.count for x in c.refusals)
        row = (f"{_safe(c.client_id, 18):<18} {_safe(c.state, 9):<9} {seen:>7} {c.rounds_trained:>6} "
               f"{c.compute_s:>7.1f}s {_bytes(c.bytes_sent):>9} {_bytes(c.bytes_received):>9} {refused:>7}")
        lines.append(row[:width])
    if len(s.clients) < s.clients_total:
        lines.append(f"... {s.clients_total - len(s.clients)} more clients (--offset / --limit)")
    if s.refusals:
        lines.append("")
        lines.append("refusals")
        for x in s.refusals:
            lines.append(f"  {_safe(x.reason, 16):<16} {x.count:>6}  {_safe(x.last_message, width - 28)}"[:width])
        for c in s.clients:
            if c.refusals:
                shown = ", ".join(f"{_safe(x.reason, 16)} x{x.count}" for x in c.refusals)
                lines.append(f"  {_safe(c.client_id, 18)}: {shown}"[:width])
    return "\n".join(lines)
