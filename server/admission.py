"""Every check of an update, in one place: admit(header) -> ticket, then commit(ticket, tensors).

admit, before the payload is read (so a refused update costs its header only):
  run id (WRONG_RUN), round open and for this round and validation (ROUND_CLOSED), sampled
  (NOT_SAMPLED), base version (STALE_VERSION), kind (WRONG_KIND), weight in (0, tasks
  assigned] (BAD_WEIGHT), metric schema of common/metrics.py (BAD_METRICS), tensor specs
  (BAD_TENSORS), --max-update-bytes (TOO_LARGE); a resend of a counted update is a duplicate.
commit, on the decoded tensors:
  every |value| <= MAX_UPDATE_ABS (common/algorithms/outer.py: Adam squares each coordinate;
  g^2 overflows float32 for |g| > 1.8e19) and the norm <= --max-update-norm (BAD_VALUES),
  both outside the lock, and under --clusters that it changes exactly one cluster (BAD_TENSORS);
  then, under it, the round again, NormFilter (--norm-clip-factor
  scales an outlier down to factor x the recent median norm), and the weighted sums.
An update weighs min(claimed, assigned) tasks, so no client outweighs what it was given.

Not thread-safe by itself: the Coordinator calls the round and counting parts under its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import torch

from fedmeta.common.aggregation import NormFilter, update_norm
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.algorithms.outer import MAX_UPDATE_ABS
from fedmeta.common.clusters import cluster_of
from fedmeta.common.codec import TensorSetHeader, TensorSpec, abs_max, check_specs
from fedmeta.common.config import RunConfig
from fedmeta.common.logformat import fields
from fedmeta.common.metrics import allowed_metrics, check_metrics
from fedmeta.common.refusal import Reason
from fedmeta.common.textsafe import RateLimit, clip
from fedmeta.server.errors import Rejected
from fedmeta.server.rounds import Round

log = logging.getLogger("fedmeta.coordinator")

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class UpdateMeta:
    """The header of a submitted update, as domain values."""

    run_id: str
    round: int
    client_id: str
    base_version: str
    kind: UpdateKind | None  # None: evaluation metrics
    weight: float
    metrics: Mapping[str, float]
    tensors: TensorSetHeader | None
    validation: bool = False


@dataclass(frozen=True)
class Ticket:
    """An admitted header: what commit counts, and with what weight."""

    meta: UpdateMeta
    weight: float
    duplicate: bool = False

    @property
    def carries_tensors(self) -> bool:
        return self.meta.tensors is not None and self.meta.kind is not None


def check_run(run_id: str, ours: str) -> None:
    if run_id != ours:
        raise Rejected(PRECONDITION, f"run {clip(run_id, 80)!r} is not this coordinator's run {ours!r}; "
                       "call Join again", Reason.WRONG_RUN)


def check_round(rnd: Round | None, meta: UpdateMeta, expected_kind: UpdateKind) -> Round:
    """The open round, if meta is an answer to it."""
    if rnd is None or meta.round != rnd.index:
        current = "none is open" if rnd is None else f"the current round is {rnd.index}"
        raise Rejected(PRECONDITION, f"update for round {meta.round} refused: {current}", Reason.ROUND_CLOSED)
    if meta.client_id not in rnd.sampled:
        raise Rejected(PRECONDITION, f"client {meta.client_id!r} is not sampled in round {rnd.index}",
                       Reason.NOT_SAMPLED)
    if meta.base_version != rnd.version:
        raise Rejected(PRECONDITION, f"update computed from version {meta.base_version[:12]!r}; round {rnd.index} "
                       f"trains version {rnd.version[:12]!r}", Reason.STALE_VERSION)
    if meta.validation != rnd.validation:
        what = "the validation after" if rnd.validation else "round"
        raise Rejected(PRECONDITION, f"update {'for' if meta.validation else 'not for'} a validation refused: "
                       f"{what} {rnd.index if not rnd.validation else rnd.index - 1} is open", Reason.ROUND_CLOSED)
    expected = None if rnd.evaluation else expected_kind
    if meta.kind != expected:
        want = "evaluation metrics" if expected is None else expected.value
        got = "evaluation metrics" if meta.kind is None else meta.kind.value
        raise Rejected(INVALID, f"round {rnd.index} expects {want}, got {got}", Reason.WRONG_KIND)
    return rnd


def assigned_tasks(run: RunConfig, meta: UpdateMeta) -> int:
    """The most an update may weigh: the tasks the coordinator assigned a client for the round."""
    if meta.kind is not None:
        return run.tasks_per_client
    return run.val_tasks_per_client if meta.validation else run.eval_tasks_per_client


def check_header(run: RunConfig, meta: UpdateMeta, specs: tuple[TensorSpec, ...], max_update_bytes: int) -> float:
    """Weight, metrics and tensor list of a header; returns the weight to count it with."""
    evaluation, validation = meta.kind is None, meta.validation
    assigned = assigned_tasks(run, meta)
    if not (0 < meta.weight <= assigned):
        flag = ("--val-tasks-per-client" if validation else "--eval-tasks-per-client" if evaluation
                else "--tasks-per-client")
        raise Rejected(INVALID, f"weight: expected a number of tasks in (0, {assigned}] (the {assigned} tasks this "
                       f"coordinator assigned, {flag}), got {meta.weight!r}", Reason.BAD_WEIGHT)
    allowed = allowed_metrics(run, evaluation=evaluation, validation=validation)
    if len(meta.metrics) > len(allowed):
        raise Rejected(INVALID, f"metrics: expected at most {len(allowed)} entries, got {len(meta.metrics)}",
                       Reason.BAD_METRICS)
    try:
        check_metrics(run, meta.metrics, evaluation=evaluation, validation=validation)
    except ValueError as exc:
        raise Rejected(INVALID, str(exc), Reason.BAD_METRICS) from None
    weight = min(meta.weight, float(assigned))
    if meta.kind is None:
        if meta.tensors is not None and meta.tensors.specs:
            raise Rejected(INVALID, "an evaluation update carries no tensors", Reason.BAD_TENSORS)
        return weight
    if meta.tensors is None:
        raise Rejected(INVALID, "the update header lists no tensors", Reason.BAD_TENSORS)
    if meta.tensors.total_bytes > max_update_bytes:
        raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"update of {meta.tensors.total_bytes} bytes is over the cap of "
                       f"{max_update_bytes} bytes (--max-update-bytes)", Reason.TOO_LARGE)
    try:
        check_specs(meta.tensors.specs, specs)
    except ValueError as exc:
        raise Rejected(INVALID, str(exc), Reason.BAD_TENSORS) from None
    return weight


def check_values(tensors: Mapping[str, torch.Tensor], max_update_norm: float | None) -> float:
    """Magnitude and (unless None) norm bounds; returns the update's L2 norm. O(model), no lock needed."""
    flat = getattr(tensors, "flat", None)  # decode()'s one vector under every tensor: one op, not one per tensor
    peak = abs_max(flat) if flat is not None else max((abs_max(t) for t in tensors.values()), default=0.0)
    if not peak <= MAX_UPDATE_ABS:
        raise Rejected(INVALID, f"update values up to {peak:.3g} exceed {MAX_UPDATE_ABS:.0e}, more than a float32 "
                       "outer step can absorb (Adam squares them); no honest update is that large", Reason.BAD_VALUES)
    norm = update_norm(tensors)
    if max_update_norm is not None and norm > max_update_norm:
        raise Rejected(INVALID, f"update norm {norm:.4g} is over --max-update-norm {max_update_norm:g}",
                       Reason.BAD_VALUES)
    return norm


def check_cluster(tensors: Mapping[str, torch.Tensor], clusters: int) -> int | None:
    """--clusters K: the one cluster an update changes (BAD_TENSORS if none or several); None without clusters.

    The coordinator reads the cluster off the tensors themselves: a client cannot name a cluster that does
    not exist (its tensors' names are checked against the run's), nor count in two.
    """
    if clusters <= 1:
        return None
    try:
        return cluster_of(tensors, clusters)
    except ValueError as exc:
        raise Rejected(INVALID, str(exc), Reason.BAD_TENSORS) from None


class Admission:
    """Which updates count: the checks above, the (round, client) pairs counted, the norm filter."""

    def __init__(self, run: RunConfig, specs: tuple[TensorSpec, ...], expected_kind: UpdateKind, *,
                 max_update_bytes: int, max_update_norm: float | None, norm_filter: NormFilter) -> None:
        self.run = run
        self.specs = specs
        self.expected_kind = expected_kind
        self.max_update_bytes = max_update_bytes
        self.max_update_norm = max_update_norm  # None: no refusal by norm (also under clipped-mean, which scales)
        self.norm_filter = norm_filter
        self._clip_log = RateLimit(burst=3, window_s=60.0)
        # (round, validation) -> clients counted: a validation before round r is not round r.
        self.accepted: dict[tuple[int, bool], set[str]] = {}

    def counted(self, meta: UpdateMeta) -> bool:
        return meta.client_id in self.accepted.get((meta.round, meta.validation), ())

    def admit(self, meta: UpdateMeta, rnd: Round | None) -> Ticket:
        """Under the lock: a duplicate, or the round checks; then the header checks (lock not needed)."""
        if self.counted(meta):
            return Ticket(meta, 0.0, duplicate=True)
        check_round(rnd, meta, self.expected_kind)
        return Ticket(meta, 0.0)

    def weigh(self, ticket: Ticket) -> Ticket:
        if ticket.duplicate:
            return ticket
        weight = check_header(self.run, ticket.meta, self.specs, self.max_update_bytes)
        return Ticket(ticket.meta, weight)

    def count(self, ticket: Ticket, rnd: Round | None, tensors: Mapping[str, torch.Tensor] | None,
              norm: float, cluster: int | None = None) -> tuple[Round | None, bool]:
        """Under the lock: count a checked update once. Returns (its round, whether it was a duplicate)."""
        meta, weight = ticket.meta, ticket.weight
        if self.counted(meta):
            return None, True
        rnd = check_round(rnd, meta, self.expected_kind)
        if tensors is not None:
            assert rnd.accumulator is not None
            limit, recent = self.norm_filter.limit(), len(self.norm_filter.recent)
            scale = self.norm_filter.scale(norm)
            if scale < 1.0:
                assert limit is not None
                if self._clip_log.allow(meta.client_id)[0]:
                    log.warning("round %d: the update from %s has L2 norm %.3g, over %g x the median of the "
                                "last %d accepted (%.3g); scaled down to it (--norm-clip-factor)", rnd.index,
                                meta.client_id, norm, self.norm_filter.factor, recent,
                                limit / self.norm_filter.factor,
                                extra=fields(event="update_clipped", round=rnd.index, client=meta.client_id))
                tensors = {k: v * scale for k, v in tensors.items()}
            rnd.norms[meta.client_id] = norm
            if cluster is not None:
                rnd.cluster_of[meta.client_id] = cluster
            rnd.accumulator.add(tensors, weight)
        for name, value in meta.metrics.items():
            rnd.metric_sums[name] = rnd.metric_sums.get(name, 0.0) + weight * value
            rnd.metric_weights[name] = rnd.metric_weights.get(name, 0.0) + weight
        rnd.metric_weight += weight
        if rnd.evaluation:
            rnd.client_metrics[meta.client_id] = {**meta.metrics, "tasks": weight}
        rnd.answered.add(meta.client_id)
        self.accepted.setdefault((meta.round, meta.validation), set()).add(meta.client_id)
        return rnd, False

    def forget_before(self, round_index: int) -> None:
        """Duplicates of rounds more than 8 before are no longer recognised (their rounds refuse them)."""
        self.accepted = {k: s for k, s in self.accepted.items() if k[0] >= round_index - 8}
