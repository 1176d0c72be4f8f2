"""The run configuration every participant shares, and its validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from common.codec import DEFAULT_CHUNK_BYTES, ENCODINGS
from common.models import ModelSpec

CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Bounds on the work a run configuration asks of a client (it comes over the wire from the
# coordinator): a meta-batch of at most 2**30 float32 inputs (4 GiB), at most 10,000 steps.
MAX_BATCH_VALUES = 1 << 30
MAX_STEPS = 10_000
_INPUT_VALUES = {"sinusoid": 1, "omniglot": 28 * 28}  # per example; gaussian: dim


def check_client_id(client_id: str) -> str:
    if not CLIENT_ID.match(client_id):
        raise ValueError(f"expected 1-64 characters from [A-Za-z0-9._-], got {client_id!r}")
    return client_id


@dataclass(frozen=True)
class RunConfig:
    """What the coordinator tells every client when it joins (see RunConfig in coordinator.proto)."""

    run_id: str
    algorithm: str = "maml"
    task: str = "sinusoid"
    model: ModelSpec = field(default_factory=lambda: ModelSpec("mlp", {"in_features": 1, "hidden": [40, 40], "out_features": 1}))
    shots: int = 5
    queries: int = 10
    tasks_per_client: int = 10
    inner_steps: int = 1
    inner_lr: float = 0.01
    seed: int = 0
    encoding: str = "float32"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    eval_shots: int = 5
    eval_steps: int = 10
    eval_tasks_per_client: int = 150
    poll_timeout_s: float = 10.0
    rounds: int = 1500
    eval_queries: int = 100
    ways: int = 5
    dim: int = 16
    partition: str = "alphabet"
    shards: int = 4
    rotations: bool = True
    first_order_rounds: int = 0
    msl: bool = True
    lslr: bool = True
    cosine_outer: bool = True
    local_steps: int = 5
    local_lr: float = 0.01
    perfedavg_variant: str = "fo"
    eval_every: int = 0
    val_tasks_per_client: int = 20
    # Classes per held-out task in the final evaluation; None: `ways` (set in __post_init__).
    eval_ways: int | None = None
    # Held-out tasks per client whose adaptation curve is measured (the first ones); 0: no curve.
    eval_curve_tasks: int = 10

    def __post_init__(self) -> None:
        from common.algorithms import ALGORITHMS
        from common.tasks import PARTITIONS, TASKS, is_classification

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm: expected one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        check = ALGORITHMS[self.algorithm].check
        if check is not None:
            check(self)
        if self.task not in TASKS:
            raise ValueError(f"--task: expected one of {sorted(TASKS)}, got {self.task!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"--encoding: expected one of {list(ENCODINGS)}, got {self.encoding!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"--partition: expected one of {list(PARTITIONS)}, got {self.partition!r}")
        for name in ("shots", "queries", "tasks_per_client", "eval_shots", "eval_tasks_per_client", "rounds",
                     "eval_queries", "dim", "shards", "local_steps", "val_tasks_per_client"):
            _positive_int(name, getattr(self, name))
        for name in ("inner_steps", "eval_steps", "eval_every", "eval_curve_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {value!r}")
        if self.perfedavg_variant not in ("fo", "hf"):
            raise ValueError(f"--perfedavg-variant: expected fo or hf, got {self.perfedavg_variant!r}")
        if not (isinstance(self.first_order_rounds, int) and self.first_order_rounds >= 0):
            raise ValueError(f"--first-order-rounds: expected an integer >= 0, got {self.first_order_rounds!r}")
        if not (self.local_lr > 0 and self.local_lr < float("inf")):
            raise ValueError(f"--local-lr: expected a positive finite number, got {self.local_lr!r}")
        if is_classification(self.task) and not (isinstance(self.ways, int) and 2 <= self.ways <= 1000):
            raise ValueError(f"--ways: expected an integer from 2 to 1000, got {self.ways!r}")
        if self.eval_ways is None:
            object.__setattr__(self, "eval_ways", self.ways)
        if is_classification(self.task):
            if not (isinstance(self.eval_ways, int) and 2 <= self.eval_ways <= 1000):
                raise ValueError(f"--eval-ways: expected an integer from 2 to 1000, got {self.eval_ways!r}")
            if self.eval_ways != self.ways and ALGORITHMS[self.algorithm].predict is None:
                raise ValueError(f"--eval-ways {self.eval_ways}: {self.algorithm} adapts a head with --ways "
                                 f"{self.ways} outputs, one per class, so it is tested {self.ways}-way; only "
                                 "protonet (no head) can test with other ways than it trains with")
        if not (self.inner_lr > 0 and self.inner_lr < float("inf")):
            raise ValueError(f"--inner-lr: expected a positive finite number, got {self.inner_lr!r}")
        if not (1024 <= self.chunk_bytes <= 3 << 20):
            raise ValueError(f"--chunk-bytes: expected 1024 to {3 << 20} (3 MiB), got {self.chunk_bytes!r}")
        if not (0.05 <= self.poll_timeout_s <= 600):
            raise ValueError(f"--poll-timeout-s: expected 0.05 to 600 seconds, got {self.poll_timeout_s!r}")
        if not (0 <= self.seed < 2**63):
            raise ValueError(f"--seed: expected an integer in [0, 2**63), got {self.seed!r}")
        _check_work(self)


def _check_work(run: RunConfig) -> None:
    """Refuse settings that would make a client allocate or compute without bound."""
    from common.tasks import is_classification

    for name in ("inner_steps", "eval_steps", "local_steps"):
        if getattr(run, name) > MAX_STEPS:
            raise ValueError(f"--{name.replace('_', '-')}: expected at most {MAX_STEPS}, got {getattr(run, name)!r}")
    per_example = _INPUT_VALUES.get(run.task, run.dim)
    classes = run.ways if is_classification(run.task) else 1
    for flags, tasks, shots, queries in (
        ("--tasks-per-client x --shots + --queries", run.tasks_per_client, run.shots, run.queries),
        ("--eval-tasks-per-client x --eval-shots + --eval-queries", run.eval_tasks_per_client, run.eval_shots,
         run.eval_queries),
    ):
        values = tasks * classes * (shots + queries) * per_example
        if values > MAX_BATCH_VALUES:
            raise ValueError(f"{flags}: a meta-batch of {values:,} input values is over {MAX_BATCH_VALUES:,} "
                             "(4 GiB of float32): use fewer tasks or examples per client")


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
