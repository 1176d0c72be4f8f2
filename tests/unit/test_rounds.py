"""The round state machine (server/rounds.py) with a fake clock: no sockets, no threads, no sleeps."""

from __future__ import annotations

import random

import pytest

from fedmeta.server.config import build
from fedmeta.server.rounds import (
    Clients, Close, Open, Policy, Resample, Round, RoundsState, Wait, apply_resample, decide, early_close,
    explore_after, pick, plan_open, quorum,
)

DEADLINE = 10.0


def policy(**settings) -> Policy:  # type: ignore[no-untyped-def]
    values = {"run_dir": "unused", "rounds": 4, "clients_per_round": 3, "min_clients": 2,
              "round_deadline_s": DEADLINE} | settings
    config = build(values)
    return Policy(config.run, config.rounds, config.clients_per_round, config.min_clients, config.round_deadline_s)


def clients(live: list[str], answered: dict[str, int] | None = None,
            benched: dict[str, int] | None = None) -> Clients:
    return Clients(sorted(live), answered or {}, benched or {})


def opened(p: Policy, state: RoundsState, c: Clients, now: float) -> Round:
    """Open a round as the coordinator would (its version and accumulator are not the policy's)."""
    decision = decide(p, state, c, now)
    assert isinstance(decision, Open), decision
    state.round = decision.round("v0", None)
    return state.round


def test_a_round_opens_with_clients_per_round_live_clients_at_once() -> None:
    p, state = policy(), RoundsState(waiting_since=0.0)
    assert decide(p, state, clients(["a", "b"]), now=1.0) == Wait()  # 2 < 3, and the deadline has not passed
    rnd = opened(p, state, clients(["a", "b", "c", "d"]), now=1.0)
    assert rnd.index == 0 and len(rnd.sampled) == 3 and rnd.deadline == 1.0 + DEADLINE
    assert not rnd.evaluation and not rnd.validation


def test_after_the_deadline_min_clients_are_enough() -> None:
    p, state = policy(), RoundsState(waiting_since=0.0)
    assert decide(p, state, clients(["a", "b"]), now=DEADLINE - 0.01) == Wait()
    rnd = opened(p, state, clients(["a", "b"]), now=DEADLINE)
    assert rnd.sampled == {"a", "b"}
    decision = plan_open(p, RoundsState(waiting_since=0.0), clients(["a", "b"]), DEADLINE)
    assert decision is not None and decision.short_of == 2  # logged: started short
    assert decide(p, RoundsState(waiting_since=0.0), clients(["a"]), now=100.0) == Wait()  # below quorum


def test_sampling_is_a_function_of_seed_round_and_attempt() -> None:
    p = policy(clients_per_round=2, min_clients=1)
    live = clients([f"c{i}" for i in range(20)])
    first = opened(p, RoundsState(), live, now=0.0).sampled
    assert opened(p, RoundsState(), live, now=5.0).sampled == first  # not the clock: (seed, round, attempt)
    by_round = [frozenset(opened(p, RoundsState(next_round=r), live, 0.0).sampled) for r in range(10)]
    assert by_round[0] == first and len(set(by_round)) > 1


def test_a_round_closes_when_every_sampled_client_answered() -> None:
    p, state = policy(), RoundsState()
    rnd = opened(p, state, clients(["a", "b", "c"]), now=0.0)
    rnd.answered |= {"a", "b"}
    assert decide(p, state, clients(["a", "b", "c"]), now=1.0) == Wait(rnd.deadline)
    rnd.answered.add("c")
    assert decide(p, state, clients(["a", "b", "c"]), now=1.0) == Close(rnd)


def test_at_the_deadline_a_quorum_closes_and_less_resamples() -> None:
    p, state = policy(), RoundsState()
    live = clients(["a", "b", "c", "d", "e"])
    rnd = opened(p, state, live, now=0.0)
    one, *_ = sorted(rnd.sampled)
    rnd.answered.add(one)
    change = decide(p, state, live, now=rnd.deadline)
    assert isinstance(change, Resample)
    assert change.attempts == 1 and change.deadline == rnd.deadline + DEADLINE
    assert change.added == frozenset({"a", "b", "c", "d", "e"} - rnd.sampled)  # every unsampled live client
    assert not change.gone  # silent but live: kept, they may still answer
    apply_resample(rnd, change)
    assert rnd.sampled == {"a", "b", "c", "d", "e"}
    rnd.answered.add(next(iter(rnd.sampled - {one})))
    assert decide(p, state, live, now=rnd.deadline) == Close(rnd)  # 2 answers >= min_clients 2


def test_resampling_drops_silent_clients_whose_lease_expired() -> None:
    p, state = policy(), RoundsState()
    rnd = opened(p, state, clients(["a", "b", "c"]), now=0.0)
    change = decide(p, state, clients(["a", "x"]), now=rnd.deadline)  # b and c left no lease; x is new
    assert isinstance(change, Resample)
    assert change.gone == {"b", "c"} and change.added == {"x"} and change.sampled == {"a", "x"}
    assert change.dropped == {"b", "c"}


def test_resampling_widens_the_search_by_4x_per_attempt() -> None:
    p, state = policy(clients_per_round=2, min_clients=2), RoundsState()
    live = clients([f"c{i:03d}" for i in range(200)])
    rnd = opened(p, state, live, now=0.0)
    added = []
    now = rnd.deadline
    for _ in range(3):
        change = decide(p, state, live, now=now)
        assert isinstance(change, Resample)
        added.append(len(change.added))
        apply_resample(rnd, change)
        now = rnd.deadline
    assert added == [2, 8, 32]


def test_the_round_closes_early_when_the_proven_clients_answered() -> None:
    p, state = policy(), RoundsState()
    answered = {"a": 3, "b": 5}
    rnd = opened(p, state, clients(["a", "b", "new"], answered), now=0.0)
    assert rnd.proven == {"a", "b"} and rnd.sampled == {"a", "b", "new"}
    rnd.answered |= {"a", "b"}
    wait = decide(p, state, clients(["a", "b", "new"], answered), now=4.0)
    assert wait == Wait(until=6.0, proven_done=4.0)  # grace: half the 4 s the proven clients took
    rnd.proven_done = wait.proven_done
    assert decide(p, state, clients(["a", "b", "new"], answered), now=5.9) == Wait(until=6.0)
    assert decide(p, state, clients(["a", "b", "new"], answered), now=6.0) == Close(rnd)
    assert early_close(p, rnd, 6.0) == (6.0, 4.0)


def test_benched_clients_are_not_sampled_until_too_few_others_are_live() -> None:
    p = policy(clients_per_round=2, min_clients=2)
    live = clients(["a", "b", "c"], benched={"c": 5})
    rnd = opened(p, RoundsState(), live, now=0.0)
    assert rnd.sampled == {"a", "b"}
    lonely = clients(["a", "c"], benched={"c": 5})
    assert decide(p, RoundsState(waiting_since=0.0), lonely, now=1.0) == Wait()
    assert opened(p, RoundsState(waiting_since=0.0), lonely, now=DEADLINE).sampled == {"a", "c"}


def test_pick_takes_proven_clients_first_and_keeps_one_newcomer_seat() -> None:
    answered = {"p1": 1, "p2": 1, "p3": 2}
    chosen = pick(["n1", "n2", "p1", "p2", "p3"], 3, random.Random(0), answered)
    assert len([c for c in chosen if c.startswith("p")]) == 2 and len(chosen) == 3
    assert set(pick(["n1", "p1", "p2", "p3"], 3, random.Random(0), answered, explore=False)) == {"p1", "p2", "p3"}
    assert set(pick(["n1", "n2"], 5, random.Random(0), {})) == {"n1", "n2"}  # nobody proven yet


def test_newcomer_seats_back_off_while_newcomers_stay_silent() -> None:
    state = RoundsState()
    rnd = Round(4, False, {"p", "n"}, 0.0, 1.0, "v", None, proven={"p"}, answered={"p"})
    assert explore_after(rnd, state) == (4 + 2, 1)
    state.explore_misses = 6
    assert explore_after(rnd, state) == (4 + 64, 7)  # capped at 64 rounds
    rnd.answered.add("n")
    assert explore_after(rnd, state) == (4 + 1, 0)
    p = policy(clients_per_round=2, min_clients=1)
    no_seat = opened(p, RoundsState(next_round=3, explore_at=5), clients(["p1", "p2", "n"], {"p1": 1, "p2": 1}), 0.0)
    assert no_seat.sampled == {"p1", "p2"}


def test_validation_rounds_come_before_the_round_they_follow_and_sample_without_newcomers() -> None:
    p = policy(eval_every=2, clients_per_round=2, min_clients=1)
    answered = {"a": 1, "b": 1}
    live = clients(["a", "b", "n"], answered)
    assert not opened(p, RoundsState(next_round=1), live, 0.0).validation
    rnd = opened(p, RoundsState(next_round=2), live, 0.0)
    assert rnd.validation and rnd.evaluation and rnd.index == 2 and rnd.sampled == {"a", "b"}
    assert quorum(p, rnd) == 1
    assert not opened(p, RoundsState(next_round=2, validated_through=2), live, 0.0).validation


def test_after_the_last_round_every_candidate_evaluates_then_nothing_opens() -> None:
    p = policy(rounds=2)
    live = clients(["a", "b", "c", "d", "e"])
    rnd = opened(p, RoundsState(next_round=2), live, 0.0)
    assert rnd.evaluation and not rnd.validation and rnd.sampled == {"a", "b", "c", "d", "e"}
    rnd.answered.add("a")
    assert decide(p, RoundsState(next_round=2, round=rnd), live, now=rnd.deadline) == Close(rnd)  # quorum 1
    assert decide(p, RoundsState(next_round=3, evaluation_done=True), live, 0.0) == Wait()
    assert decide(p, RoundsState(), live, 0.0, stopping=True) == Wait()


@pytest.mark.parametrize("answered", [set(), {"a"}])
def test_nothing_happens_before_the_deadline_without_every_answer(answered: set[str]) -> None:
    p, state = policy(), RoundsState()
    rnd = opened(p, state, clients(["a", "b", "c"]), now=0.0)
    rnd.answered |= answered
    assert decide(p, state, clients(["a", "b", "c"]), now=rnd.deadline - 1e-6) == Wait(rnd.deadline)
