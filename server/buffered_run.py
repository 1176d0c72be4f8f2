"""Applies the buffered schedule's decisions (server/buffered.py) to the coordinator's parts.

The Coordinator calls assignment/admit/commit/heartbeat/leave under its lock; the round
thread calls step() (the outer step, outside the lock like a synchronous round's close:
only that thread changes θ and the optimiser state) and drop().
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
import torch

from fedmeta.common.round_aggregator import make_round_aggregator
from fedmeta.common.refusal import Reason
from fedmeta.common.algorithms.outer import guarded_step
from fedmeta.common.textsafe import RateLimit
from fedmeta.server import buffered
from fedmeta.server.admission import Ticket, UpdateMeta
from fedmeta.server.buffered import Assigned, Buffer, BufferedState, BufferPolicy, Drop
from fedmeta.server.errors import Rejected

if TYPE_CHECKING:
    from fedmeta.server.round_thread import Coordinator, RoundThread

log = logging.getLogger("fedmeta.coordinator")


class BufferedRounds:
    """The buffered schedule's state in a running coordinator."""

    def __init__(self, c: Coordinator, *, resumed: Mapping[str, Any]) -> None:
        self.c = c
        self.policy = BufferPolicy.of(c.config.run, c.config.clients_per_round)
        stored = resumed.get("buffered") or {}
        self.state = BufferedState(self._new_buffer(), next_number=max(1, int(stored.get("next_assignment", 1))))
        self._last_step_at = c.clock()
        self._clip_log = RateLimit(burst=3, window_s=60.0)
        if resumed:
            log.info("buffered rounds resume with an empty buffer: updates accepted after the checkpoint and "
                     "assignments handed out before the restart are not carried over (their clients train again)")

    def _new_buffer(self) -> Buffer:
        cfg = self.c.config
        return Buffer(make_round_aggregator(cfg.aggregator, self.c.layout, max_norm=cfg.max_update_norm,
                                            trim=cfg.trim_fraction))

    # ---- under the coordinator's lock (but commit, which takes it) ---------------------------------
    def step_now(self) -> int:
        """The θ an update accepted now is applied to: outer steps taken, plus one being made, plus one per
        full buffer waiting: what τ is counted against."""
        return self.c.state.next_round + (1 if self.c.broadcast.stepping else 0) + buffered.pending_steps(self.state)

    def busy(self) -> set[str]:
        return set(self.state.assigned)

    def assignment(self, client_id: str) -> Assigned | None:
        """A TRAIN assignment for a client asking for work, or None (slots taken, a step or an evaluation due)."""
        c = self.c
        if (c.holding() or c.broadcast.stepping or buffered.evaluation_due(c.policy, c.state) or c.state.evaluation_done
                or self.step_now() >= c.policy.rounds):  # the buffers waiting already make the last steps
            return None
        a = buffered.plan_assignment(self.policy, self.state, client_id, step=c.state.next_round,
                                     version=c.broadcast.version, now=c.clock())
        if a is not None:
            buffered.apply_assignment(self.state, a)
        return a

    def heartbeat(self, client_id: str, number: int) -> bool:
        held = self.state.assigned.get(client_id)
        return (held is not None and held.number == number
                and self.step_now() - held.step <= self.policy.max_staleness)

    def leave(self, client_id: str) -> None:
        self.state.assigned.pop(client_id, None)

    def _checked(self, meta: UpdateMeta) -> Assigned:
        if self.step_now() >= self.c.policy.rounds:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, f"update for assignment {meta.round} refused: the "
                           f"buffers already hold the updates of the last of {self.c.policy.rounds} outer steps "
                           "(--rounds)", Reason.ROUND_CLOSED)
        held = buffered.check_update(self.policy, self.state, number=meta.round, client_id=meta.client_id,
                                     base_version=meta.base_version, kind=meta.kind,
                                     expected_kind=self.c.admission.expected_kind, validation=meta.validation)
        try:
            buffered.check_staleness(self.policy, held, step=self.step_now())
        except Rejected:
            self.state.assigned.pop(meta.client_id, None)  # it can never count: free its slot
            self.state.refused_stale += 1
            raise
        return held

    def admit(self, meta: UpdateMeta) -> Ticket:
        if buffered.is_duplicate(self.state, meta.round, meta.client_id):
            return Ticket(meta, 0.0, duplicate=True)
        self._checked(meta)
        return Ticket(meta, 0.0)

    def commit(self, ticket: Ticket, tensors: Mapping[str, torch.Tensor] | None, norm: float) -> bool:
        """Takes the lock: count a checked update once, weighted s(τ) with τ counted now. Returns whether it
        was a duplicate."""
        if tensors is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "a training update carries tensors", Reason.BAD_TENSORS)
        with self.c._cond:
            self.c.registry.check_not_revoked(ticket.meta.client_id, f"its update for assignment {ticket.meta.round} "
                                              "is")  # revoked mid-stream
            duplicate = self._count(ticket, tensors, norm)
            if not duplicate:
                self.c.telemetry.update_accepted("train")
                self.c._cond.notify_all()  # a full buffer for the round thread, a free slot for a waiting client
        return duplicate

    def _count(self, ticket: Ticket, tensors: Mapping[str, torch.Tensor], norm: float) -> bool:
        meta = ticket.meta
        if buffered.is_duplicate(self.state, meta.round, meta.client_id):
            return True
        held = self._checked(meta)
        tau = self.step_now() - held.step
        s = buffered.staleness_weight(tau, self.policy.exponent)
        nf = self.c.admission.norm_filter
        limit = nf.limit()
        clip = nf.scale(norm)
        if clip < 1.0 and limit is not None and self._clip_log.allow(meta.client_id)[0]:
            log.warning("the update from %s has L2 norm %.3g, over %g x the recent median (%.3g); scaled down to it "
                        "(--norm-clip-factor)", meta.client_id, norm, nf.factor, limit / nf.factor)
        scale = s * clip
        scaled = tensors if scale == 1.0 else {k: v * scale for k, v in tensors.items()}
        buffered.accept(self.policy, self.state, held, scaled, weight=ticket.weight, tau=tau, s=s, norm=norm,
                        metrics=meta.metrics, fresh=self._new_buffer)
        return False

    def meta(self) -> dict[str, Any]:
        """What a checkpoint keeps of the buffered schedule (the buffer itself is dropped on resume)."""
        return {"next_assignment": self.state.next_number}

    # ---- the round thread --------------------------------------------------------------------------
    def drop(self, decision: Drop) -> None:
        """Under the lock: forget assignments that can no longer count."""
        for cid in decision.clients:
            self.state.assigned.pop(cid, None)
        log.info("dropped the training assignments of %d clients: %s", len(decision.clients), decision.why)
        self.c._cond.notify_all()

    def step(self, thread: RoundThread) -> None:
        """The outer step on the buffer (outside the lock), a new version, the checkpoint and the record."""
        c = self.c
        with c._cond:
            buf, step = self.state.ready.popleft(), c.state.next_round
            in_place = c.broadcast.begin_step()  # no new reader, no new assignment of the old version
            refused, self.state.refused_stale = self.state.refused_stale, 0
        theta = c.broadcast.theta if in_place else c.broadcast.theta.clone()
        lr = guarded_step(c.outer, theta, buf.accumulator.take_mean(), step)
        if lr is None:
            log.error("outer step %d: it made theta or the optimiser state non-finite; undone. Largest updates: %s. "
                      "If none stands out, lower --outer-lr", step,
                      ", ".join(f"{k} ({v:.3g})" for k, v in sorted(buf.norms.items(), key=lambda kv: -kv[1])[:5]))
        with c._cond:
            c.broadcast.publish(theta)
            now = c.clock()
            c.state.next_round = step + 1
            c.state.waiting_since = now
            round_s, self._last_step_at = now - self._last_step_at, now
            c.registry.tally(step, buf.contributors, ())
            c._cond.notify_all()  # waiting clients get the new version
        if c.next_round % c.config.checkpoint_every == 0 or c.next_round == c.config.rounds:
            thread._save_checkpoint()
        metrics = buf.metrics()
        thread._record({
            "round": step,
            "schedule": "buffered",
            "seed": c.config.run.seed,
            "meta_loss": metrics.get("loss_post"),
            "loss_pre": metrics.get("loss_pre"),
            "updates": buf.count,
            "clients_sampled": len(buf.contributors),
            "clients_answered": len(buf.contributors),
            **buffered.staleness_summary(buf),
            "refused_stale": refused,
            "round_s": round_s,
            "client_compute_s": metrics.get("compute_s"),
            "outer_lr": lr,
            "step_undone": lr is None,
            "version": c.version,
            "bytes_sent": c.runstate.bytes_sent,
            "bytes_received": c.runstate.bytes_received,
            "wall_s": c.runstate.wall_s,
        })

