"""Update admission (server/admission.py): every check of a header and of the values, counting once."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from fedmeta.common.aggregation import FlatLayout, NormFilter, WeightedMean
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.algorithms.outer import MAX_UPDATE_ABS
from fedmeta.common.codec import encode
from fedmeta.common.refusal import Reason
from fedmeta.server.admission import Admission, Ticket, UpdateMeta, check_header, check_values
from fedmeta.server.config import build
from fedmeta.server.errors import Rejected
from fedmeta.server.rounds import Round


def rejected(call) -> Rejected:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as info:
        call()
    return info.value


RUN = build({"run_dir": "unused", "tasks_per_client": 4}).run
LAYOUT = FlatLayout.of({"w": torch.zeros(2, 2), "b": torch.zeros(2)})


def meta(**kw) -> UpdateMeta:  # type: ignore[no-untyped-def]
    tensors = encode(LAYOUT.views(torch.zeros(LAYOUT.numel))).header
    values = {"run_id": RUN.run_id, "round": 0, "client_id": "a", "base_version": "v", "kind": UpdateKind.META_GRADIENT,
              "weight": 2.0, "metrics": {"loss_pre": 1.0, "loss_post": 0.5}, "tensors": tensors} | kw
    return UpdateMeta(**values)


def admission(norm_refusal: float | None = None) -> Admission:
    return Admission(RUN, LAYOUT.specs, UpdateKind.META_GRADIENT, max_update_bytes=1 << 20,
                     max_update_norm=norm_refusal, norm_filter=NormFilter(factor=0, window=4, warmup=1))


def open_round() -> Round:
    return Round(0, False, {"a", "b"}, 0.0, 10.0, "v", WeightedMean(LAYOUT))


@pytest.mark.parametrize("change, reason", [
    ({"round": 1}, Reason.ROUND_CLOSED),
    ({"client_id": "z"}, Reason.NOT_SAMPLED),
    ({"base_version": "old"}, Reason.STALE_VERSION),
    ({"validation": True}, Reason.ROUND_CLOSED),
    ({"kind": UpdateKind.PARAMETER_DELTA}, Reason.WRONG_KIND),
])
def test_admit_refuses_answers_to_another_round(change, reason) -> None:
    assert rejected(lambda: admission().admit(meta(**change), open_round())).reason == reason


@pytest.mark.parametrize("change, reason", [
    ({"weight": 5.0}, Reason.BAD_WEIGHT),
    ({"weight": 0.0}, Reason.BAD_WEIGHT),
    ({"weight": math.nan}, Reason.BAD_WEIGHT),
    ({"metrics": {"loss_pre": 1.0, "loss_post": 0.5, "made_up": 1.0}}, Reason.BAD_METRICS),
    ({"tensors": None}, Reason.BAD_TENSORS),
    ({"tensors": encode({"w": torch.zeros(2, 2)}).header}, Reason.BAD_TENSORS),
])
def test_the_header_checks_name_their_reason(change, reason) -> None:
    assert rejected(lambda: check_header(RUN, meta(**change), LAYOUT.specs, 1 << 20)).reason == reason
    too_big = rejected(lambda: check_header(RUN, meta(), LAYOUT.specs, 8))
    assert too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_big.reason == Reason.TOO_LARGE


def test_values_are_bounded_before_counting() -> None:
    assert rejected(lambda: check_values({"w": torch.full((2,), MAX_UPDATE_ABS * 2)}, None)).reason == Reason.BAD_VALUES
    assert rejected(lambda: check_values({"w": torch.full((4,), 1.0)}, 1.5)).reason == Reason.BAD_VALUES
    assert check_values({"w": torch.full((4,), 1.0)}, None) == pytest.approx(2.0)


def test_commit_counts_once_with_the_admitted_weight() -> None:
    a, rnd = admission(), open_round()
    ticket = a.weigh(a.admit(meta(), rnd))
    assert ticket == Ticket(meta(), 2.0)
    tensors = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    counted, duplicate = a.count(ticket, rnd, tensors, norm=math.sqrt(6))
    assert counted is rnd and not duplicate
    assert rnd.answered == {"a"} and rnd.metric_weight == 2.0 and rnd.accumulator.count == 1
    assert a.count(ticket, rnd, tensors, norm=1.0) == (None, True)
    assert a.admit(meta(), rnd).duplicate and rnd.accumulator.count == 1
    a.forget_before(9)
    assert not a.counted(meta())
