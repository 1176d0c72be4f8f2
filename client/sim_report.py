"""fedmeta-sim's report: what the virtual clients saw accepted, by node and by round, from the ledger.

An update is `accepted` when the coordinator answered accepted and not duplicate; `in doubt` when
it was sent but no answer was recorded (its host was killed mid-submit: the coordinator may or may
not have counted it). Exactly-once, against the coordinator's metrics.jsonl: for each training
round, accepted <= clients_answered <= accepted + in doubt, and no (client, round) accepted twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedmeta.client.sim_plan import SimConfig

Key = tuple[str, int, str]  # (client, round, kind)


class Ledgerless(RuntimeError):
    """The ledger actor could not be read (the report has no update counts)."""


@dataclass(frozen=True)
class Report:
    virtual_clients: int
    placements: list[dict[str, Any]]
    replaced: int
    lost_actors: list[int]
    accepted: dict[str, int]  # kind -> updates accepted once
    by_node: dict[str, int]  # node id -> accepted training updates
    by_actor: dict[str, dict[str, int]]  # "actor.incarnation" -> kind -> accepted updates
    accepted_per_round: dict[int, int]  # training round -> accepted updates
    in_doubt_per_round: dict[int, int]
    duplicates: int  # answers "duplicate": a retried stream the coordinator already counted
    counted_twice: list[Key] = field(default_factory=list)  # accepted (not duplicate) more than once: a bug

    def text(self) -> str:
        nodes = ", ".join(f"{n[:12]} {c}" for n, c in sorted(self.by_node.items()))
        kinds = ", ".join(f"{k} {c}" for k, c in sorted(self.accepted.items())) or "none"
        return (f"updates accepted: {kinds}; training updates by node: {nodes or 'none'}; duplicates answered "
                f"{self.duplicates}; in doubt {sum(self.in_doubt_per_round.values())}; counted twice "
                f"{len(self.counted_twice)}; actors replaced {self.replaced}"
                + (f"; actors given up {self.lost_actors}" if self.lost_actors else ""))

    def as_json(self) -> dict[str, Any]:
        return {"virtual_clients": self.virtual_clients, "placements": self.placements, "replaced": self.replaced,
                "lost_actors": self.lost_actors, "accepted": self.accepted, "by_node": self.by_node,
                "by_actor": self.by_actor,
                "accepted_per_round": {str(r): n for r, n in sorted(self.accepted_per_round.items())},
                "in_doubt_per_round": {str(r): n for r, n in sorted(self.in_doubt_per_round.items())},
                "duplicates": self.duplicates, "counted_twice": [list(k) for k in self.counted_twice]}


def summarize(config: SimConfig, events: list[dict[str, Any]], placements: list[dict[str, Any]],
              incarnations: list[int], lost: set[int]) -> Report:
    """The report from the ledger's events (in arrival order) and the driver's placements."""
    sent: Counter[tuple[Key, int, int]] = Counter()  # (key, actor, incarnation) -> submits without an answer yet
    once: Counter[Key] = Counter()
    node_of: dict[Key, str] = {}
    by_actor: dict[str, Counter[str]] = {}
    duplicates = 0
    for e in events:
        key: Key = (str(e["client"]), int(e["round"]), str(e["kind"]))
        where = (key, int(e["actor"]), int(e["incarnation"]))
        if e["phase"] == "submit":
            sent[where] += 1
            continue
        if sent[where] > 0:
            sent[where] -= 1
        if e.get("duplicate"):
            duplicates += 1
        elif e.get("accepted"):
            once[key] += 1
            node_of[key] = str(e["node"])
            by_actor.setdefault(f"{e['actor']}.{e['incarnation']}", Counter())[key[2]] += 1
    accepted: Counter[str] = Counter(k[2] for k in once)
    by_node: Counter[str] = Counter(node_of[k] for k in once if k[2] == "train")
    per_round: Counter[int] = Counter(k[1] for k in once if k[2] == "train")
    doubt: Counter[int] = Counter()
    for (key, _, _), n in sent.items():
        if n > 0 and key[2] == "train" and key not in once:
            doubt[key[1]] += 1
    return Report(virtual_clients=config.virtual_clients, placements=placements, replaced=sum(incarnations),
                  lost_actors=sorted(lost), accepted=dict(accepted), by_node=dict(by_node),
                  by_actor={a: dict(c) for a, c in sorted(by_actor.items())},
                  accepted_per_round=dict(per_round), in_doubt_per_round=dict(doubt), duplicates=duplicates,
                  counted_twice=sorted(k for k, n in once.items() if n > 1))
