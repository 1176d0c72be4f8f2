"""Buffered asynchronous rounds (--schedule buffered) as decisions on the state they keep.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"),
with FedAsync's polynomial staleness weight (Xie et al. 2019). A free live client asking
for work gets TRAIN against the current θ at once, while fewer than --clients-per-round
assignments are outstanding. Accepted updates enter a buffer; every --buffer-size (K) of
them the coordinator takes one outer step on

    g = Σ_i w_i s(τ_i) u_i / Σ_i w_i,    s(τ) = (1 + τ)^(-a)   (a: --staleness-exponent)

u_i an update, w_i its weight (at most the tasks the coordinator assigned), τ_i = t - t_i
the versions between its base θ_{t_i} and the θ_t it is applied to, counted when it is
accepted: t is the outer steps taken, plus one being made and one per full buffer still
waiting for its step (buffers hold exactly K updates). Dividing by Σ w_i, not Σ w_i s(τ_i), is FedBuff's
choice: a buffer of stale updates moves θ less, not just in another mix. An update with
τ > S (--max-staleness) is refused with FAILED_PRECONDITION and STALE_VERSION, on which a
client asks for new work: it fetches the current θ and trains again.

The coordinator computes τ and s(τ) from its own table of assignments: a client names an
assignment (the `round` field of its update carries the assignment's number) and its base
version, which must be the one assigned. It can name no other version, cannot make τ
negative, and never sends a weight s. The table holds at most --clients-per-round entries
(one per client; an entry whose τ passes S holds no slot, one whose client's lease lapsed
is dropped), and τ needs no version history: each entry keeps its own base step.

Validation (--eval-every) and the final evaluation are synchronous rounds
(server/rounds.py) between outer steps, and no TRAIN is handed out while one is open.
Assignments outstanding when a validation opens are kept (their updates are buffered, the
next step waits for the validation to close, so the validation sees θ_t); those
outstanding after the last step are dropped.

Resume: the buffer (fewer than K updates: less than one outer step of client work) and
the assignments are deliberately not checkpointed. A restarted coordinator starts with an
empty buffer; an update for a pre-restart assignment is refused (ROUND_CLOSED) and its
client trains again, so every update changes θ at most once. The checkpoint keeps the next
assignment number (numbers are not handed out twice across a clean restart; after a crash
a reused number with the same base version is the same computation, seeded by the number).

Not thread-safe by itself: the Coordinator calls it under its lock; the decisions are pure
functions of the state and `now` (tests/unit/test_buffered.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import torch

from fedmeta.common.aggregation import Aggregator
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.config import RunConfig
from fedmeta.common.refusal import Reason
from fedmeta.server import rounds
from fedmeta.server.errors import Rejected
from fedmeta.server.validation import due

PRECONDITION, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
REMEMBERED = 4096  # accepted assignment numbers kept to answer a resend as a duplicate


def staleness_weight(tau: int, exponent: float) -> float:
    """s(τ) = (1 + τ)^(-a): 1 for a fresh update, decreasing in τ (FedAsync's polynomial weight)."""
    if tau < 0:
        raise ValueError(f"staleness: expected tau >= 0, got {tau!r}")
    return float((1.0 + tau) ** -exponent)


@dataclass(frozen=True)
class BufferPolicy:
    """The settings the buffered schedule reads."""

    buffer_size: int  # K
    exponent: float  # a
    max_staleness: int  # S
    max_assignments: int  # --clients-per-round: TRAIN assignments outstanding at once

    @classmethod
    def of(cls, run: RunConfig, clients_per_round: int) -> BufferPolicy:
        return cls(run.buffer_size, run.staleness_exponent, run.max_staleness, clients_per_round)


@dataclass(frozen=True)
class Assigned:
    """One outstanding TRAIN assignment."""

    number: int  # sent as the assignment's `round`; the update names it
    client_id: str
    step: int  # outer steps taken when it was handed out: its base version is θ_step
    version: str
    started: float


@dataclass
class Buffer:
    """The updates accepted since the last outer step, summed as they stream in (O(model) for the mean)."""

    accumulator: Aggregator
    count: int = 0
    staleness: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # s(τ) of each update
    contributors: set[str] = field(default_factory=set)
    norms: dict[str, float] = field(default_factory=dict)
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {k: v / self.metric_weights[k] for k, v in self.metric_sums.items() if self.metric_weights.get(k)}


@dataclass
class BufferedState:
    buffer: Buffer  # filling; at K updates it joins `ready` and a fresh one takes its place
    ready: deque[Buffer] = field(default_factory=deque)  # full buffers, one outer step each, oldest first
    next_number: int = 1
    assigned: dict[str, Assigned] = field(default_factory=dict)  # client id -> its one outstanding assignment
    accepted: dict[int, str] = field(default_factory=dict)  # assignment number -> client, the last REMEMBERED
    accepted_order: deque[int] = field(default_factory=deque)
    refused_stale: int = 0  # since the last outer step


# ---- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Take the outer step on the buffer."""


@dataclass(frozen=True)
class Drop:
    """Forget these clients' assignments (their updates are refused from now on)."""

    clients: frozenset[str]
    why: str


Decision = rounds.Decision | Step | Drop


def evaluation_due(policy: rounds.Policy, state: rounds.RoundsState) -> bool:
    """Whether θ after state.next_round outer steps is evaluated (validation or the final one) before training on."""
    step = state.next_round
    return step >= policy.rounds or (state.validated_through != step and due(policy.run, step, policy.rounds))


def decide(policy: rounds.Policy, bpolicy: BufferPolicy, state: rounds.RoundsState, buffered: BufferedState,
           clients: rounds.Clients, now: float, *, stopping: bool = False) -> Decision:
    """What the round thread does next in buffered mode."""
    if state.round is not None:  # an evaluation round: as in synchronous mode
        return rounds.decide(policy, state, clients, now, stopping=stopping)
    if state.evaluation_done:
        return rounds.Wait()
    step = state.next_round
    if step >= policy.rounds and buffered.assigned:
        return Drop(frozenset(buffered.assigned), f"the last outer step ({policy.rounds}, --rounds) is taken")
    if evaluation_due(policy, state):
        opened = rounds.plan_open(policy, state, clients, now, stopping=stopping)
        return rounds.Wait() if opened is None else opened
    if buffered.ready:
        return Step()
    live = set(clients.live)
    gone = {c for c in buffered.assigned if c not in live}
    if gone:
        return Drop(frozenset(gone), "their lease expired")
    return rounds.Wait()


def plan_assignment(bpolicy: BufferPolicy, buffered: BufferedState, client_id: str, *, step: int, version: str,
                    now: float) -> Assigned | None:
    """The TRAIN assignment for a client asking for work: its outstanding one if still on the current
    version (a repeated poll is answered alike), else a new one if a slot is free (one of an older
    version is replaced: the client asking again has given it up), else None. An assignment more
    than --max-staleness versions behind holds no slot (it can no longer count; it stays in the
    table until its client asks again or leaves, so its update is refused as STALE_VERSION)."""
    held = buffered.assigned.get(client_id)
    if held is not None and held.version == version:
        return held
    busy = sum(1 for c, a in buffered.assigned.items() if c != client_id and step - a.step <= bpolicy.max_staleness)
    if busy >= bpolicy.max_assignments:
        return None
    return Assigned(buffered.next_number, client_id, step, version, now)


def apply_assignment(buffered: BufferedState, a: Assigned) -> None:
    buffered.assigned[a.client_id] = a
    buffered.next_number = max(buffered.next_number, a.number + 1)


def is_duplicate(buffered: BufferedState, number: int, client_id: str) -> bool:
    return buffered.accepted.get(number) == client_id


def check_update(bpolicy: BufferPolicy, buffered: BufferedState, *, number: int, client_id: str, base_version: str,
                 kind: UpdateKind | None, expected_kind: UpdateKind, validation: bool) -> Assigned:
    """The outstanding assignment a training update answers (Rejected if it answers none)."""
    if kind != expected_kind or validation:
        got = "evaluation metrics" if kind is None else kind.value
        raise Rejected(INVALID, f"a buffered training update carries {expected_kind.value}, got {got}"
                       f"{' for a validation' if validation else ''}", Reason.WRONG_KIND)
    held = buffered.assigned.get(client_id)
    if held is None or held.number != number:
        now_held = "none" if held is None else f"number {held.number}"
        raise Rejected(PRECONDITION, f"update for assignment {number} refused: client {client_id!r} holds {now_held} "
                       "(dropped, replaced, or from before a restart); ask for new work", Reason.ROUND_CLOSED)
    if base_version != held.version:
        raise Rejected(PRECONDITION, f"update computed from version {base_version[:12]!r}; assignment {number} "
                       f"trains version {held.version[:12]!r}", Reason.STALE_VERSION)
    return held


def check_staleness(bpolicy: BufferPolicy, held: Assigned, *, step: int) -> int:
    """τ of an update for `held` accepted at `step` (outer steps taken, plus one while a step is being
    made); Rejected with STALE_VERSION beyond --max-staleness. τ >= 0: both steps are the coordinator's."""
    tau = step - held.step
    if tau > bpolicy.max_staleness:
        raise Rejected(PRECONDITION, f"update for assignment {held.number} is {tau} versions behind, over "
                       f"--max-staleness {bpolicy.max_staleness}; fetch the current parameters and train again",
                       Reason.STALE_VERSION)
    return tau


def pending_steps(buffered: BufferedState) -> int:
    """Full buffers not yet applied: outer steps that will come before an update accepted now is applied."""
    return len(buffered.ready)


def accept(bpolicy: BufferPolicy, buffered: BufferedState, a: Assigned, tensors: Mapping[str, torch.Tensor], *,
           weight: float, tau: int, s: float, norm: float, metrics: Mapping[str, float],
           fresh: Callable[[], Buffer]) -> None:
    """Count an update once: into the filling buffer (tensors already scaled by s and any norm clip);
    at K updates the buffer is ready for an outer step and `fresh` fills next."""
    buf = buffered.buffer
    buf.accumulator.add(tensors, weight)
    buf.count += 1
    buf.staleness.append(tau)
    buf.weights.append(s)
    buf.contributors.add(a.client_id)
    buf.norms[f"{a.client_id}#{a.number}"] = norm
    for name, value in metrics.items():
        buf.metric_sums[name] = buf.metric_sums.get(name, 0.0) + weight * value
        buf.metric_weights[name] = buf.metric_weights.get(name, 0.0) + weight
    del buffered.assigned[a.client_id]
    buffered.accepted[a.number] = a.client_id
    buffered.accepted_order.append(a.number)
    while len(buffered.accepted_order) > REMEMBERED:
        buffered.accepted.pop(buffered.accepted_order.popleft(), None)
    if buf.count >= bpolicy.buffer_size:
        buffered.ready.append(buf)
        buffered.buffer = fresh()


def staleness_summary(buf: Buffer) -> dict[str, float | int | None]:
    """The staleness fields of an outer step's metrics record."""
    n = len(buf.staleness)
    return {
        "staleness_mean": sum(buf.staleness) / n if n else None,
        "staleness_max": max(buf.staleness) if n else None,
        "staleness_weight_mean": sum(buf.weights) / n if n else None,
    }
