"""What an accepted update may carry: weights the coordinator assigned, magnitudes a float32
outer step absorbs, metric names from the schema, and log lines that stay bounded.

Raw gRPC stubs against a real in-process coordinator on 127.0.0.1; the honest client computes
real MAML meta-gradients with fedmeta.common.algorithms on the sinusoid MLP.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch

from fedmeta.common import PROTOCOL_VERSION
from fedmeta.common.algorithms import InnerConfig, OuterConfig, get_algorithm
from fedmeta.common.algorithms.outer import AdamOuter
from fedmeta.common.evaluation import evaluate, evaluate_holder
from fedmeta.common.models import build_model
from fedmeta.common.proto import pb
from fedmeta.common.tasks import STREAM_TRAIN, loss_for, make_tasks, task_seed
from fedmeta.common.transfer import receive_inline
from tests.integration.conftest import InProcessServer, wait_for
from tests.integration.test_hostile import (
    END,
    Session,
    adam_step,
    assert_untouched,
    close_to,
    encoded,
    gradient,
    join,
    refused,
    session,
    snapshot,
    stream,
    submit,
)

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
Tensors = dict[str, torch.Tensor]
TIMEOUT_S = 10.0
TASKS = 2  # a power of two: the server's weighted mean w * g / w is then exactly g
FAST = {"rounds": 200, "clients_per_round": 1, "min_clients": 1, "round_deadline_s": 60.0, "tasks_per_client": TASKS,
        "checkpoint_every": 1000, "eval_tasks_per_client": 4, "eval_queries": 10, "eval_steps": 2}


# ---- an honest client over raw stubs ---------------------------------------------------------------


class Honest:
    """A client that trains with real MAML meta-gradients (as client/worker.py does), one RPC at a time."""

    def __init__(self, server: InProcessServer, client_id: str = "alice", data_seed: int = 0) -> None:
        self.server, self.client_id, self.data_seed = server, client_id, data_seed
        self.run_id = join(server, client_id).run_id
        self.run = server.coordinator.run
        self.algorithm = get_algorithm(self.run.algorithm)
        self.model = build_model(self.run.model)
        self.tasks = make_tasks(self.run, data_seed=data_seed, shard=data_seed)
        self.loss_fn = loss_for(self.run.task)

    def assignment(self, action: int) -> pb.WaitForAssignmentResponse:
        request = pb.WaitForAssignmentRequest(run_id=self.run_id, client_id=self.client_id)

        def poll() -> pb.WaitForAssignmentResponse | None:
            a = self.server.stub.WaitForAssignment(request, timeout=TIMEOUT_S)
            return a if a.action == action else None

        return wait_for(poll, timeout_s=60, interval_s=0, what=f"assignment {action} for {self.client_id}")

    @staticmethod
    def inline(a: pb.WaitForAssignmentResponse) -> Tensors:
        return {k: v.clone() for k, v in receive_inline(a.parameters, max_bytes=1 << 24).items()}

    def meta_gradient(self, params: Tensors, round_index: int) -> tuple[Tensors, dict[str, float]]:
        seed = task_seed(self.run.seed, self.data_seed, STREAM_TRAIN, round_index)
        batch = self.tasks.sample("train", num_tasks=self.run.tasks_per_client, shots=self.run.shots,
                                  queries=self.run.queries, seed=seed)
        inner = InnerConfig.from_run(self.run, round_index=round_index, vectorize=True)
        update = self.algorithm.client_step(self.model, params, batch, self.loss_fn, inner)
        return update.tensors, {**update.metrics, "compute_s": 0.01}

    def held_out_loss(self, theta: torch.Tensor, layout: Any) -> float:
        """Query loss after one adaptation step, over 50 fixed held-out tasks (the control's yardstick)."""
        batch = self.tasks.sample("eval", num_tasks=50, shots=self.run.shots, queries=10, seed=12345)
        m = evaluate(self.algorithm, self.model, layout.views(theta.clone()), batch, self.loss_fn, steps=1,
                     lr=self.run.inner_lr)
        return m["loss_post"]

    def session(self, a: pb.WaitForAssignmentResponse) -> Session:
        return Session(self.server, self.client_id, self.run_id, a.round, a.parameter_version, self.inline(a))

    def submit(self, s: Session, tensors: Tensors, metrics: dict[str, float], weight: float = TASKS) -> None:
        reply = submit(s, stream(*encoded(s, tensors, weight=weight, metrics=metrics)))
        assert reply.accepted and not reply.duplicate

    def evaluate(self) -> tuple[Session, dict[str, float]]:
        a = self.assignment(pb.ACTION_EVALUATE)
        s = self.session(a)
        return s, evaluate_holder(self.algorithm, self.model, s.params, self.tasks, self.run, data_seed=self.data_seed)


def submit_evaluation(s: Session, metrics: dict[str, float], weight: float) -> pb.SubmitUpdateResponse:
    header = pb.UpdateHeader(run_id=s.run_id, round=s.round, client_id=s.client_id, base_version=s.version,
                             kind=pb.UPDATE_KIND_EVALUATION, weight=weight, metrics=metrics)
    return submit(s, [pb.SubmitUpdateRequest(header=header), END])


def adam_state(c: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in c.outer.state_dict().items()}


def finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# ---- Part 3: no accepted update freezes or poisons the outer optimiser ------------------------------


def test_adam_poison_is_refused_and_200_honest_rounds_follow_the_control_trajectory(inprocess_server) -> None:
    server = inprocess_server(**FAST)
    c = server.coordinator
    alice = Honest(server)
    a = alice.assignment(pb.ACTION_TRAIN)
    s = alice.session(a)
    before, state_before = snapshot(s), adam_state(c)

    # One finite meta-gradient coordinate of 1e29: g^2 overflows float32 inside Adam.
    g, metrics = alice.meta_gradient(s.params, 0)
    poison = {k: v.clone() for k, v in g.items()}
    poison["net.2.weight"][3, 7] = 1e29
    err = refused(lambda: submit(s, stream(*encoded(s, poison, weight=TASKS, metrics=metrics))))
    assert err.code() == Code.INVALID_ARGUMENT and "float32" in err.details(), err.details()
    assert_untouched(s, before)
    assert {k: v.tolist() for k, v in adam_state(c).items()} == {k: v.tolist() for k, v in state_before.items()}

    # 200 honest rounds; the control applies the same Adam steps to the same gradients locally, and
    # each round the server's theta must be the control's (so the gradients are the same too).
    control = c.layout.flatten(s.params)
    initial = alice.held_out_loss(control, c.layout)
    adam = AdamOuter(OuterConfig(lr=c.config.outer_lr, rounds=c.config.rounds))
    for r in range(c.config.rounds):
        if r:
            a = alice.assignment(pb.ACTION_TRAIN)
            s = alice.session(a)
            g, metrics = alice.meta_gradient(s.params, r)
        assert a.round == r
        assert torch.allclose(c.layout.flatten(s.params), control, rtol=0, atol=1e-6), f"round {r}: theta differs"
        alice.submit(s, g, metrics)
        adam.step(control, c.layout.flatten(g), r)
    wait_for(lambda: c.next_round == c.config.rounds, timeout_s=30, what="the last training round to close")
    assert torch.allclose(c.layout.flatten(c.parameters()), control, rtol=0, atol=1e-6)
    assert finite(c.outer.state_dict()) and int(c.outer.state_dict()["step"]) == c.config.rounds
    assert alice.held_out_loss(c.layout.flatten(c.parameters()), c.layout) < 0.9 * initial, "the run did not learn"

    s, metrics = alice.evaluate()
    assert submit_evaluation(s, metrics, 4).accepted
    wait_for(lambda: c.finished.is_set(), timeout_s=30, what="the run to finish")
    assert c.summary is not None and c.summary["rounds_completed"] == c.config.rounds


def test_finite_but_huge_update_is_scaled_down_and_training_goes_on(inprocess_server, caplog) -> None:
    """1e15 in every coordinate passes the hard bound; unclipped, Adam's second moment would hold 1e27
    and every later step would be ~1e-13 of a normal one. The median-norm clip scales it to 10x a
    typical norm."""
    rounds = 100
    server = inprocess_server(**(FAST | {"rounds": rounds}))
    c = server.coordinator
    alice = Honest(server)
    control = None
    adam = AdamOuter(OuterConfig(lr=c.config.outer_lr, rounds=rounds))
    attacked = 10
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        for r in range(rounds):
            s = alice.session(alice.assignment(pb.ACTION_TRAIN))
            if control is None:
                control = c.layout.flatten(s.params)
                initial = alice.held_out_loss(control, c.layout)
            g, metrics = alice.meta_gradient(s.params, r)
            if r == attacked:
                assert c._norm_filter.limit() is not None, "the clip should be warmed up"
                g = {k: torch.full_like(v, 1e15) for k, v in g.items()}  # every coordinate
            alice.submit(s, g, metrics)
            # the control run: the same client without the attack, on its own theta
            cg, _ = alice.meta_gradient(c.layout.views(control.clone()), r)
            adam.step(control, c.layout.flatten(cg), r)
        wait_for(lambda: c.next_round == rounds, timeout_s=30, what="the last training round to close")
    assert any("scaled down" in rec.getMessage() and "alice" in rec.getMessage() for rec in caplog.records)
    state = c.outer.state_dict()
    assert finite(state) and finite(c.parameters())
    assert float(state["exp_avg_sq"].max()) < 1e4, "the outlier filled Adam's second moment"
    assert control is not None
    final, control_final = alice.held_out_loss(c.layout.flatten(c.parameters()), c.layout), alice.held_out_loss(
        control, c.layout)
    assert control_final < initial, "the control run should learn"
    # About as much as the control learned: the clipped update counts like ~10 honest ones and costs ~11%
    # of the progress; unclipped it freezes Adam (v ~ 1e27) and ~75% of the progress is lost.
    assert final - control_final < 0.25 * (initial - control_final), (initial, final, control_final)


def test_an_outer_step_to_non_finite_theta_is_undone_and_the_run_goes_on(inprocess_server, caplog) -> None:
    """Reptile at --outer-lr 1e25: a delta of 1e18 (at the hard bound) takes theta past float32's
    range. The step is undone, the round's largest update is named, and the run goes on."""
    server = inprocess_server(algorithm="reptile", outer_lr=1e25, rounds=3, clients_per_round=1, min_clients=1,
                              round_deadline_s=60.0)
    c = server.coordinator
    s = session(server, "alice", join(server, "alice").run_id)
    before = snapshot(s)
    huge = {k: torch.full_like(v, 1e18) for k, v in s.params.items()}
    with caplog.at_level(logging.ERROR, logger="fedmeta"):
        reply = submit(s, stream(*encoded(s, huge, kind=pb.UPDATE_KIND_PARAMETER_DELTA)))
        assert reply.accepted
        wait_for(lambda: c.next_round == 1, timeout_s=20, what="round 0 to close")
    assert any("undone" in r.getMessage() and "alice (norm 4.2e+19)" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert c.version == before.version and not c.finished.is_set()
    assert all(torch.equal(c.parameters()[k], v) for k, v in before.theta.items())
    path = c.rundir.metrics_path
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), timeout_s=20, what="round 0's record")
    record = json.loads(path.read_text().splitlines()[0])
    assert record["round"] == 0 and record["step_undone"] is True and record["outer_lr"] is None
    # round 1 trains the same version, and a sane delta moves theta
    s1 = session(server, "alice", s.run_id)
    assert (s1.round, s1.version) == (1, before.version)
    small = {k: torch.full_like(v, 1e-27) for k, v in s.params.items()}
    assert submit(s1, stream(*encoded(s1, small, kind=pb.UPDATE_KIND_PARAMETER_DELTA))).accepted
    wait_for(lambda: c.version != before.version, timeout_s=20, what="round 1 to close")
    assert finite(c.parameters())


# ---- Part 4: the coordinator decides weights --------------------------------------------------------


def test_a_claimed_weight_over_the_assigned_tasks_is_refused(inprocess_server) -> None:
    server = inprocess_server(rounds=3, clients_per_round=2, min_clients=2, round_deadline_s=60.0,
                              tasks_per_client=10)
    run_id = join(server, "alice").run_id
    join(server, "bob")
    alice, bob = session(server, "alice", run_id), session(server, "bob", run_id)
    before = snapshot(alice)
    ga = {k: torch.full_like(v, 1.0) for k, v in alice.params.items()}
    gb = {k: torch.full_like(v, -3.0) for k, v in bob.params.items()}
    for claim in (1e9, 10.5):
        err = refused(lambda: submit(bob, stream(*encoded(bob, gb, weight=claim))))
        assert err.code() == Code.INVALID_ARGUMENT, err.details()
        assert "weight" in err.details() and "--tasks-per-client" in err.details(), err.details()
        assert_untouched(alice, before, hostile_client="bob")
    assert submit(alice, stream(*encoded(alice, ga, weight=10.0))).accepted
    assert submit(bob, stream(*encoded(bob, gb, weight=10.0))).accepted
    c = server.coordinator
    wait_for(lambda: c.version != before.version, timeout_s=20, what="round 0 to close")
    # Equal weights: the mean is -1 everywhere, and Adam's first step moves every coordinate by +lr.
    assert close_to(c.parameters(), adam_step(alice, before.theta, [(ga, 1.0), (gb, 1.0)]))


def eval_metrics(steps: int, shots: int, loss: float) -> dict[str, float]:
    """A complete, self-consistent sinusoid evaluation report with every loss equal to `loss`."""
    names = ["loss_pre", "loss_post", *(f"curve_{k}" for k in range(steps + 1)), f"shots_{shots}", f"shots_{2 * shots}"]
    return {n: loss for n in names} | {"loss_pre_sq": loss * loss, "loss_post_sq": loss * loss}


def test_a_claimed_weight_cannot_change_the_evaluation_summary(inprocess_server) -> None:
    server = inprocess_server(**(FAST | {"rounds": 1, "clients_per_round": 2, "min_clients": 2}))
    c = server.coordinator
    alice, bob = Honest(server, "alice", 0), Honest(server, "bob", 1)
    for h in (alice, bob):
        s = h.session(h.assignment(pb.ACTION_TRAIN))
        h.submit(s, *h.meta_gradient(s.params, 0))
    run = c.run
    sa, sb = alice.session(alice.assignment(pb.ACTION_EVALUATE)), bob.session(bob.assignment(pb.ACTION_EVALUATE))
    lying = eval_metrics(run.eval_steps, run.eval_shots, 0.0)
    err = refused(lambda: submit_evaluation(sb, lying, 1e9))
    assert err.code() == Code.INVALID_ARGUMENT and "--eval-tasks-per-client" in err.details(), err.details()
    # Leaving a pooled metric out (so that it would count as 0) is refused too.
    err = refused(lambda: submit_evaluation(sb, {k: v for k, v in lying.items() if k != "loss_post"}, 4))
    assert err.code() == Code.INVALID_ARGUMENT and "loss_post" in err.details(), err.details()
    assert not c.finished.is_set() and "bob" not in c._accepted.get(sb.round, set())
    assert submit_evaluation(sa, eval_metrics(run.eval_steps, run.eval_shots, 2.0), 4).accepted
    assert submit_evaluation(sb, lying, 4).accepted
    wait_for(lambda: c.finished.is_set(), timeout_s=30, what="the run to finish")
    assert c.summary is not None
    summary = c.summary["eval"]
    assert summary["loss_post"] == pytest.approx(1.0) and summary["loss_pre"] == pytest.approx(1.0)
    assert summary["tasks"] == 8 and summary["per_client"]["bob"]["tasks"] == 4


# ---- Part 5: metrics are a schema ---------------------------------------------------------------------

BAD_NAMES = {"curve_1_x": "curve_1_x", "5000-digit-curve": "curve_" + "9" * 5000, "1-mib-name": "m" * (1 << 20)}


def test_metric_names_outside_the_schema_are_refused_and_the_run_finishes(inprocess_server) -> None:
    server = inprocess_server(**(FAST | {"rounds": 1}))
    c = server.coordinator
    alice = Honest(server)
    s = alice.session(alice.assignment(pb.ACTION_TRAIN))
    g, metrics = alice.meta_gradient(s.params, 0)
    before = snapshot(s)
    for label, name in BAD_NAMES.items():  # during training
        err = refused(lambda: submit(s, stream(*encoded(s, g, weight=TASKS, metrics={**metrics, name: 1.0}))))
        assert err.code() == Code.INVALID_ARGUMENT, (label, err.code(), err.details()[:200])
        assert "metric" in err.details() and len(err.details()) < 1200, (label, err.details()[:200])
        assert_untouched(s, before)
    alice.submit(s, g, metrics)

    s, real = alice.evaluate()
    for label, name in BAD_NAMES.items():  # and in the evaluation, where curve_<k> names are legitimate
        err = refused(lambda: submit_evaluation(s, {**real, name: 1.0}, 4))
        assert err.code() == Code.INVALID_ARGUMENT, (label, err.code(), err.details()[:200])
        assert len(err.details()) < 1200, label
    for bad in ({"loss_post": -1.0}, {"curve_0": float("nan")}, {"loss_post_sq": 0.0}, {"tasks": 1e9}):
        err = refused(lambda: submit_evaluation(s, real | bad, 4))
        assert err.code() == Code.INVALID_ARGUMENT, (bad, err.details())
    assert not c.finished.is_set()
    assert submit_evaluation(s, real, 4).accepted
    wait_for(lambda: c.finished.is_set(), timeout_s=30, what="the run to finish")
    assert c.summary is not None
    summary = c.summary["eval"]
    assert summary["loss_post"] == pytest.approx(real["loss_post"]) and summary["tasks"] == 4
    assert len(summary["curve"]) == c.run.eval_steps + 1
    assert set(summary["by_shots"]) == {str(c.run.eval_shots), str(2 * c.run.eval_shots)}


# ---- Part 10: logs cannot be flooded --------------------------------------------------------------------


@contextmanager
def captured_log() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedmeta")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_fifty_refusals_with_1_mib_metric_names_add_little_to_the_log(inprocess_server) -> None:
    server = inprocess_server(rounds=3, clients_per_round=1, min_clients=1, round_deadline_s=60.0,
                              chunk_bytes=3 << 20)
    s = session(server, "alice", join(server, "alice").run_id)
    before = snapshot(s)
    flood: Callable[[int], list[pb.SubmitUpdateRequest]] = lambda i: stream(*encoded(  # noqa: E731
        s, gradient(s), metrics={"loss_pre": 2.0, f"{i}\n{'x' * (1 << 20)}": 1.0}))
    with captured_log() as log:
        for i in range(50):
            err = refused(lambda: submit(s, flood(i)))
            assert err.code() == Code.INVALID_ARGUMENT, err.details()[:200]
            assert len(err.details()) < 1200
        # other peer-supplied text quoted in a refusal: a 1 MiB client id, run id, device string
        for fields, code in (({"client_id": "c" * (1 << 20)}, Code.INVALID_ARGUMENT),
                             ({"run_id": "r\n" * (1 << 19)}, Code.FAILED_PRECONDITION)):
            err = refused(lambda: submit(s, stream(*encoded(s, gradient(s), **fields))))
            assert err.code() == code and len(err.details()) < 1200, (code, err.details()[:200])
        server.stub.Join(pb.JoinRequest(client_id="bob", protocol_version=PROTOCOL_VERSION,
                                        device="gpu\n" * (1 << 18)), timeout=TIMEOUT_S)
    assert len(server.coordinator._clients["bob"].device) < 100
    text = log.getvalue()
    assert len(text.encode()) < 100_000, f"the log grew by {len(text.encode())} bytes"
    lines = text.splitlines()
    assert sum("refused (" in line for line in lines) == 10, text[:3000]
    assert sum("not logging more" in line for line in lines) == 1, text[:3000]
    assert all(len(line) < 2000 for line in lines), "a log line is unbounded"
    assert_untouched(s, before)
    reply = submit(s, stream(*encoded(s, gradient(s))))  # the peer is still served, only not logged
    assert reply.accepted and not reply.duplicate
