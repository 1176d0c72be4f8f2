"""The round state machine as pure functions of the round state, the clients and `now`.

    decide(policy, state, clients, now) -> Open | Close | Resample | Wait

No clock, lock, socket or log in the decisions (the Coordinator applies them under its
lock, with its clock), so tests/unit/test_rounds.py drives every transition with a fake
`now`. A round:

- opens when clients_per_round unbenched clients are live, or min_clients are once the
  coordinator has waited --round-deadline-s (then benched ones count too if too few are
  unbenched). Training rounds sample clients_per_round of them (pick: proven first, one
  newcomer seat from round explore_at on); the validation before round r
  (--eval-every) samples the same way without newcomer seats; the final evaluation
  (after --rounds) takes every candidate.
- closes when every sampled client answered; or at the deadline with at least the quorum
  (min_clients, 1 for an evaluation); or early, once every proven sampled client answered
  and the quorum is met, 0.5 x the proven clients' time after the last of them.
- is resampled at a deadline without quorum: silent clients whose lease expired are
  dropped, up to clients_per_round * 4**(attempt-1) live unsampled ones are added, and the
  deadline moves --round-deadline-s on.
Sampling is a pure function of (seed, round, attempt).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedmeta.common.aggregation import Aggregator
from fedmeta.common.config import RunConfig
from fedmeta.server.validation import due


@dataclass(frozen=True)
class Policy:
    """The settings the round state machine reads."""

    run: RunConfig  # seed and --eval-every
    rounds: int
    clients_per_round: int
    min_clients: int
    round_deadline_s: float


@dataclass
class Round:
    index: int
    evaluation: bool
    sampled: set[str]
    started: float
    deadline: float
    version: str
    accumulator: Aggregator | None
    answered: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weight: float = 0.0
    metric_weights: dict[str, float] = field(default_factory=dict)  # per name: the weight of who sent it
    norms: dict[str, float] = field(default_factory=dict)  # per client: its update's L2 norm as sent
    cluster_of: dict[str, int] = field(default_factory=dict)  # --clusters: the cluster each update changed, in order
    attempts: int = 0
    proven: set[str] = field(default_factory=set)  # sampled clients that had answered a round before
    proven_done: float | None = None  # when the last of them answered
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation rounds only
    validation: bool = False  # an evaluation round on validation tasks during training (--eval-every)


@dataclass
class RoundsState:
    """What the round policy remembers between rounds (the open round included)."""

    next_round: int = 0
    validated_through: int = 0  # rounds trained when θ was last validated
    waiting_since: float = 0.0  # since when no round is open
    evaluation_done: bool = False
    # Exploration: a round offers seats to clients that never answered only from round
    # explore_at on; each round whose newcomers all stayed silent doubles the gap (to 64).
    explore_at: int = 0
    explore_misses: int = 0
    round: Round | None = None


@dataclass(frozen=True)
class Clients:
    """The registry as the policy sees it: live ids (sorted), rounds answered, benched-until round."""

    live: Sequence[str]
    answered: Mapping[str, int]
    benched_until: Mapping[str, int]


@dataclass(frozen=True)
class Open:
    index: int
    evaluation: bool
    validation: bool
    sampled: frozenset[str]
    proven: frozenset[str]
    started: float
    deadline: float
    short_of: int = 0  # > 0: opened with fewer than clients_per_round live candidates (how many there were)
    waited_s: float = 0.0

    def round(self, version: str, accumulator: Aggregator | None) -> Round:
        return Round(self.index, self.evaluation, set(self.sampled), self.started, self.deadline, version,
                     accumulator, proven=set(self.proven), validation=self.validation)


@dataclass(frozen=True)
class Close:
    round: Round


@dataclass(frozen=True)
class Resample:
    sampled: frozenset[str]
    proven: frozenset[str]
    dropped: frozenset[str]
    gone: frozenset[str]  # silent clients dropped: their lease expired
    added: frozenset[str]
    attempts: int
    deadline: float


@dataclass(frozen=True)
class Wait:
    until: float | None = None  # when something is due by the clock alone; None: only a change wakes it
    proven_done: float | None = None  # set rnd.proven_done to this (the last proven client just answered)


Decision = Open | Close | Resample | Wait


def quorum(policy: Policy, rnd: Round) -> int:
    return 1 if rnd.evaluation else policy.min_clients


def pick(candidates: Sequence[str], n: int, rng: random.Random, answered: Mapping[str, int], *,
         explore: bool = True) -> list[str]:
    """n of candidates (sorted): clients that have answered a round before first; newcomers fill
    the seats left, and with explore one seat is kept for a newcomer when n >= 2. Without
    explore, newcomers are picked only if no client has answered yet."""
    proven = [c for c in candidates if answered.get(c, 0) > 0]
    fresh = [c for c in candidates if answered.get(c, 0) == 0]
    if not proven:
        return rng.sample(fresh, min(n, len(fresh)))
    if not explore:
        return rng.sample(proven, min(n, len(proven)))
    explore_seats = 1 if n >= 2 and fresh else 0
    chosen = rng.sample(proven, min(len(proven), n - explore_seats))
    return chosen + rng.sample(fresh, min(len(fresh), n - len(chosen)))


def unbenched(ids: Sequence[str], clients: Clients, round_index: int) -> list[str]:
    return [c for c in ids if clients.benched_until.get(c, -1) <= round_index]


def plan_open(policy: Policy, state: RoundsState, clients: Clients, now: float, *,
              stopping: bool = False) -> Open | None:
    """The next round if it may open now, else None."""
    if state.evaluation_done or stopping or state.round is not None:
        return None
    index = state.next_round
    validation = state.validated_through != index and due(policy.run, index, policy.rounds)
    evaluation = validation or index >= policy.rounds
    target = policy.clients_per_round
    waited = now - state.waiting_since
    live = list(clients.live)
    candidates = unbenched(live, clients, index)
    if len(candidates) < policy.min_clients and waited >= policy.round_deadline_s:
        candidates = live  # too few unbenched clients: give benched ones another chance
    enough = len(candidates) >= target or (len(candidates) >= policy.min_clients
                                           and waited >= policy.round_deadline_s)
    if not enough:
        return None
    seed = policy.run.seed
    if validation:  # cheap: the round's usual number of clients, val_tasks_per_client tasks each
        sampled = set(pick(candidates, target, random.Random(f"{seed}:{index}:validation"), clients.answered,
                           explore=False))
    elif evaluation:
        sampled = set(candidates)
    else:
        sampled = set(pick(candidates, target, random.Random(f"{seed}:{index}:0"), clients.answered,
                           explore=index >= state.explore_at))
    proven = frozenset(c for c in sampled if clients.answered.get(c, 0) > 0)
    short = len(candidates) if len(sampled) < target and len(candidates) < target and not evaluation else 0
    return Open(index, evaluation, validation, frozenset(sampled), proven, now, now + policy.round_deadline_s,
                short_of=short, waited_s=waited)


def early_close(policy: Policy, rnd: Round, now: float) -> tuple[float | None, float | None]:
    """(when the round may close before its deadline although some sampled clients are silent,
    the proven_done time to record); (None, None) if it may not.

    Clients that have never answered a round are not waited for once every sampled client
    that has answered before did (and the quorum is met), beyond a grace of half the time
    those took: a fake id that joins and never trains costs a round at most 1.5x its pace,
    while a first-time client up to 1.5x slower than the proven ones is still counted."""
    if not rnd.proven or not rnd.proven <= rnd.answered or len(rnd.answered) < quorum(policy, rnd):
        return None, None
    done = now if rnd.proven_done is None else rnd.proven_done
    return done + 0.5 * (done - rnd.started), done


def plan_resample(policy: Policy, rnd: Round, clients: Clients, now: float) -> Resample:
    """Too few answers at the deadline: drop silent clients whose lease expired (slow but live
    ones may still answer), add live clients not yet sampled, extend the deadline.

    Each deadline missed widens the search: attempt k adds up to clients_per_round * 4**(k-1)
    clients, so silent ids that keep their lease (join, heartbeat, never train) delay a round
    by O(log(ids)) deadlines, not by one deadline per id."""
    live = set(clients.live)
    gone = (rnd.sampled - rnd.answered) - live
    attempts = rnd.attempts + 1
    candidates = unbenched(sorted(live - rnd.sampled), clients, rnd.index)
    rng = random.Random(f"{policy.run.seed}:{rnd.index}:{attempts}")
    target = policy.clients_per_round
    need = max(target - len(rnd.sampled - gone), target * 4 ** min(attempts - 1, 8))
    fresh = set(pick(candidates, min(need, len(candidates)), rng, clients.answered))
    sampled = (rnd.sampled - gone) | fresh
    proven = (rnd.proven - gone) | {c for c in fresh if clients.answered.get(c, 0) > 0}
    dropped = (rnd.dropped | gone) - sampled
    return Resample(frozenset(sampled), frozenset(proven), frozenset(dropped), frozenset(gone), frozenset(fresh),
                    attempts, now + policy.round_deadline_s)


def decide(policy: Policy, state: RoundsState, clients: Clients, now: float, *, stopping: bool = False) -> Decision:
    """What the round thread does next."""
    rnd = state.round
    if rnd is None:
        opened = plan_open(policy, state, clients, now, stopping=stopping)
        return Wait() if opened is None else opened
    complete = bool(not rnd.sampled - rnd.answered and rnd.answered)
    wake = rnd.deadline
    early, proven_done = early_close(policy, rnd, now)
    if early is not None and not complete:
        complete = now >= early
        wake = min(early, rnd.deadline)
    if complete or (now >= rnd.deadline and len(rnd.answered) >= quorum(policy, rnd)):
        return Close(rnd)
    if now >= rnd.deadline:
        return plan_resample(policy, rnd, clients, now)
    return Wait(wake, proven_done if rnd.proven_done is None else None)


def apply_resample(rnd: Round, change: Resample) -> None:
    rnd.sampled, rnd.proven, rnd.dropped = set(change.sampled), set(change.proven), set(change.dropped)
    rnd.attempts, rnd.deadline = change.attempts, change.deadline


def explore_after(rnd: Round, state: RoundsState) -> tuple[int, int]:
    """(explore_at, explore_misses) after rnd closed: a round whose newcomers all stayed silent
    doubles the gap before the next newcomer seat, up to 64 rounds; one that answered resets it."""
    newcomers = rnd.sampled - rnd.proven
    if not newcomers or rnd.evaluation:
        return state.explore_at, state.explore_misses
    misses = 0 if newcomers & rnd.answered else state.explore_misses + 1
    return rnd.index + 2 ** min(misses, 6), misses
