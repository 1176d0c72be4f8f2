"""benchmarks/load_clients.py's analysis of one run: exactly-once counts, θ replayed, stalls, latencies.

Not a benchmark itself.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._load_worker import pattern

MB = 1e6


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99 (inclusive method), max and mean of a sample."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=100, method="inclusive") if len(v) > 1 else [v[0]] * 99
    return {"n": len(v), "p50": q[49], "p90": q[89], "p99": q[98], "max": v[-1], "mean": statistics.fmean(v)}


def analyse(spec: Any, values: dict[str, Any], run_dir: Path, clients: list[dict[str, Any]],
            server_log: str) -> dict[str, Any]:
    """Exactly-once counts, theta recomputed round by round, stalls and latencies of one run."""
    import torch
    from safetensors.torch import load_file

    from fedmeta.common.aggregation import FlatLayout
    from fedmeta.common.algorithms import OuterConfig, get_algorithm
    from fedmeta.common.codec import encode
    from fedmeta.common.models import init_parameters
    from fedmeta.server.config import build

    config = build(values)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    subs = [(c["index"], r) for c in clients for r in c["records"]]
    status = Counter(f"{r['action']}:{r['status']}" for _, r in subs)
    accepted: dict[int, list[tuple[int, int]]] = defaultdict(list)  # round -> [(client index, scale)]
    for index, r in subs:
        if r["action"] == "train" and r["status"] == "ok":
            accepted[r["round"]].append((index, r["scale"]))
    twice = sum(n - 1 for n in Counter((i, r["round"]) for i, r in subs if r["status"] == "ok").values())
    resends = Counter(r["resend"] for _, r in subs if "resend" in r)
    eval_ok = status["evaluate:ok"]
    per_round = [{"round": rec["round"], "clients_ok": len(accepted[rec["round"]]),
                  "clients_answered": rec["clients_answered"], "round_s": rec["round_s"]} for rec in records]
    counts_match = all(p["clients_ok"] == p["clients_answered"] for p in per_round)
    exactly_once = (counts_match and twice == 0 and eval_ok == summary["eval"]["clients"] and not resends["counted"]
                    and [p["round"] for p in per_round] == list(range(spec.rounds))
                    and sum(len(v) for v in accepted.values()) == sum(p["clients_answered"] for p in per_round))

    params = init_parameters(config.run.model, config.run.seed)
    layout = FlatLayout.of(params)
    theta = layout.flatten(params)
    outer = get_algorithm(config.run.algorithm).make_outer(OuterConfig(lr=config.outer_lr, rounds=config.rounds))
    unit = pattern(layout.numel)
    versions_match = 0
    for rec in records:
        ok = accepted[rec["round"]]
        # The coordinator sums s_i * P (exact in float32), divides by the summed weights (1 each), steps.
        mean = (unit * float(sum(s for _, s in ok))) / float(len(ok))
        outer.step(theta, mean, rec["round"])
        versions_match += encode(layout.views(theta)).header.sha256.hex() == rec["version"]
    exported = layout.flatten(load_file(str(run_dir / "model" / "model.safetensors")))
    theta_diff = float((exported - theta).abs().max())
    theta_ok = versions_match == len(records) and bool(torch.equal(exported, theta))

    deadline = values["round_deadline_s"]
    round_s = [rec["round_s"] for rec in records]
    train = [r for _, r in subs if r["action"] == "train" and r["status"] == "ok"]
    spans = []
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in train:
        by_round[r["round"]].append(r)
    for rs in by_round.values():
        spans.append(max(r["done"] for r in rs) - min(r["assigned"] for r in rs))
    deadline_passed = server_log.count("deadline passed")
    no_stall = (all(s < deadline for s in round_s) and deadline_passed == 0
                and all(rec["clients_answered"] == spec.sampled for rec in records))
    errors = [e for c in clients for e in c["errors"]]
    joined = [c["joined_at"] for c in clients if c["joined_at"]]
    bytes_per_round = None
    if len(records) > 1:
        first, last = records[0], records[-1]
        bytes_per_round = (last["bytes_sent"] + last["bytes_received"] - first["bytes_sent"]
                           - first["bytes_received"]) / (len(records) - 1) / MB
    return {
        "label": spec.label,
        "clients": spec.clients,
        "sampled_per_round": spec.sampled,
        "processes": spec.processes,
        "rounds": spec.rounds,
        "model": {"task": spec.task, "spec": {"name": config.run.model.name, "kwargs": config.run.model.kwargs}},
        "parameters": layout.numel,
        "server_settings": values | {"run_dir": "<tmp>"},
        "checks": {"exactly_once": exactly_once, "theta_matches": theta_ok, "no_stall": no_stall,
                   "no_client_errors": not errors and all(c["finished"] for c in clients)},
        "exactly_once": {
            "per_round": per_round,
            "accepted_submissions": sum(len(v) for v in accepted.values()),
            "clients_answered_total": sum(p["clients_answered"] for p in per_round),
            "client_round_pairs_accepted_twice": twice,
            "resends_acknowledged_as_duplicate": resends["duplicate"],
            "resends_counted_again": resends["counted"],
            "eval_ok": eval_ok,
            "eval_clients_in_summary": summary["eval"]["clients"],
            "submission_outcomes": dict(status),
        },
        "theta": {"rounds_whose_version_matches": versions_match, "rounds": len(records),
                  "exported_equals_recomputed": bool(torch.equal(exported, theta)), "max_abs_diff": theta_diff,
                  "abs_max": float(theta.abs().max())},
        "stalls": {"round_deadline_s": deadline, "rounds_over_deadline": sum(s >= deadline for s in round_s),
                   "deadline_passed_log_lines": deadline_passed,
                   "rounds_short_of_all_clients": sum(rec["clients_answered"] != spec.sampled for rec in records)},
        "latency_s": {
            "round_s": percentiles(round_s),
            "round_s_excl_round_0": percentiles(round_s[1:]),
            "round_0_s": round_s[0] if round_s else None,
            # a carried update's "done" is when its long-poll left (its answer comes when the poll ends)
            "client_assignment_to_accepted": percentiles([r["done"] - r["assigned"] for r in train
                                                          if not r.get("carried")]),
            "client_assignment_to_sent_with_the_next_poll": percentiles([r["done"] - r["assigned"] for r in train
                                                                         if r.get("carried")]),
            "client_fetch": percentiles([r["fetch_s"] for r in train]),
            "client_submit": percentiles([r["submit_s"] for r in train if r["submit_s"] is not None]),
            "round_span_first_assignment_to_last_accept": percentiles(spans),
        },
        "joins_spread_s": max(joined) - min(joined) if joined else None,
        "inlined_assignments": sum(c["inlined"] for c in clients),
        "fetches": sum(c["fetched"] for c in clients),
        "updates_carried_by_polls": sum(c.get("carried", 0) for c in clients),
        "client_retries": sum(c["retries"] for c in clients),
        "client_retry_codes": dict(sum((Counter(c.get("retry_codes", {})) for c in clients), Counter())),
        "client_retry_details": {k: v for c in clients for k, v in c.get("retry_details", {}).items()},
        "leave_after_finished_refused": dict(Counter(c["leave_failed"] for c in clients if c["leave_failed"])),
        "client_errors": errors[:20],
        "client_error_count": len(errors),
        "mb_per_round": bytes_per_round,
        "summary_wall_s": summary["wall_s"],
    }
