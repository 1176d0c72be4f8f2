"""The run configuration every participant shares: its settings, declared once, and its validation.

Each field's `setting(...)` metadata is its flag, TOML key, type, range, help and defaults (see
common/settings.py); the algorithms' own settings are added as fields from the registry. The
coordinator builds a RunConfig from flags (server/config.py), a client from the Join message
(common/wire.py): both are checked here, by the same declarations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedmeta.common.algorithms import ALGORITHM_OPTIONS, ALGORITHMS
from fedmeta.common.codec import DEFAULT_CHUNK_BYTES, ENCODINGS
from fedmeta.common.models import NORMS, ZOO, ModelSpec, default_model
from fedmeta.common.settings import Setting, Values, check_fields, setting, settings_of, with_options
from fedmeta.common.tasks import PARTITIONS, TASKS, is_classification

CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Bounds on the work a run configuration asks of a client (it comes over the wire from the
# coordinator): a meta-batch of at most 2**30 float32 inputs (4 GiB), at most 10,000 steps.
MAX_BATCH_VALUES = 1 << 30
MAX_STEPS = 10_000
_INPUT_VALUES = {"sinusoid": 1, "omniglot": 28 * 28}  # per example; gaussian: dim
SCHEDULES = ("sync", "buffered")


def check_client_id(client_id: str) -> str:
    if not CLIENT_ID.match(client_id):
        raise ValueError(f"expected 1-64 characters from [A-Za-z0-9._-], got {client_id!r}")
    return client_id


def _model(v: Values) -> ModelSpec:
    return default_model(v["task"], ways=v["ways"], dim=v["dim"], name=v["model"], algorithm=v["algorithm"],
                         norm=v["norm"])


# An input of the model field only (it becomes the conv4 spec's "norm" kwarg).
NORM = Setting("norm", str,
               "conv4's normalisation: support (default; batch norm with the support set's statistics, queries "
               "predicted one by one), group or layer (per example), batch (each batch's own statistics: "
               "transductive, a prediction depends on the other queries)", choices=NORMS)



def _MLP() -> ModelSpec:  # noqa: N802
    return ModelSpec("mlp", {"in_features": 1, "hidden": [40, 40], "out_features": 1})


@dataclass(frozen=True)
@with_options(ALGORITHM_OPTIONS)
class RunConfig:
    """What the coordinator tells every client when it joins (see RunConfig in coordinator.proto)."""

    run_id: str
    algorithm: str = field(default="maml", metadata=setting(
        "meta-learning algorithm", choices=tuple(sorted(ALGORITHMS)), resume=True))
    task: str = field(default="sinusoid", metadata=setting(
        "task family: sinusoid regression, gaussian or omniglot classification", choices=tuple(sorted(TASKS)),
        resume=True))
    model: ModelSpec = field(default_factory=_MLP, metadata=setting(
        "model (default: mlp for sinusoid and gaussian, conv4 for omniglot)", type=str, default=None,
        choices=tuple(sorted(ZOO)), to_field=_model, resume=True))
    shots: int = field(default=5, metadata=setting("support examples per task (K in K-shot)", minimum=1,
                                                   resume=True))
    queries: int = field(default=10, metadata=setting(
        "query examples per task, per class for classification (default: 10; 15 for omniglot)", minimum=1,
        per_task={"sinusoid": 10, "gaussian": 10, "omniglot": 15}, resume=True))
    tasks_per_client: int = field(default=10, metadata=setting(
        "tasks each sampled client trains on per round (its meta-batch)", minimum=1, resume=True))
    inner_steps: int = field(default=1, metadata=setting("inner-loop SGD steps in training", minimum=0,
                                                         resume=True))
    # Finn et al. 2017 use an inner lr of 0.4 for Omniglot.
    inner_lr: float = field(default=0.01, metadata=setting(
        "inner-loop learning rate (default: 0.01 for sinusoid, 0.4 for classification)", minimum=0.0, positive=True,
        per_task={"sinusoid": 0.01, "gaussian": 0.4, "omniglot": 0.4}, resume=True))
    seed: int = field(default=0, metadata=setting("run seed: model init, client sampling, task streams", minimum=0,
                                                  maximum=2**63 - 1, resume=True))
    encoding: str = field(default="float32", metadata=setting("transport encoding of floating-point tensors",
                                                              choices=ENCODINGS))
    chunk_bytes: int = field(default=DEFAULT_CHUNK_BYTES, metadata=setting(
        "payload bytes per stream chunk", minimum=1024, maximum=3 << 20))
    eval_shots: int = field(default=5, metadata=setting(
        "support examples per held-out task in the final evaluation (default: --shots)", minimum=1,
        derive=lambda v: v["shots"]))
    eval_steps: int = field(default=10, metadata=setting(
        "adaptation steps in the final evaluation (default: 10; --inner-steps for metasgd and mamlpp, whose step "
        "sizes are learned for that many)", minimum=0,
        derive=lambda v: v["inner_steps"] if ALGORITHMS[v["algorithm"]].learned_steps else 10))
    eval_tasks_per_client: int = field(default=150, metadata=setting(
        "held-out tasks each client adapts on in the final evaluation (4 clients: 600)", minimum=1))
    poll_timeout_s: float = field(default=10.0, metadata=setting(
        "seconds the server holds a WaitForAssignment long-poll", minimum=0.05, maximum=600))
    rounds: int = field(default=1500, metadata=setting("training rounds (outer steps)", minimum=1, resume=True))
    eval_queries: int = field(default=100, metadata=setting(
        "query examples per held-out task (per class) in the final evaluation (default: 100 for sinusoid, 20 for "
        "gaussian, 15 for omniglot)", minimum=1, per_task={"sinusoid": 100, "gaussian": 20, "omniglot": 15}))
    ways: int = field(default=5, metadata=setting("classes per classification task (N in N-way)", minimum=2,
                                                  maximum=1000, resume=True))
    dim: int = field(default=16, metadata=setting("gaussian: input dimension", minimum=1, maximum=100000,
                                                  resume=True))
    partition: str = field(default="alphabet", metadata=setting(
        "omniglot: how classes are split among clients (alphabet: whole alphabets, non-IID)", choices=PARTITIONS,
        resume=True))
    shards: int = field(default=4, metadata=setting(
        "shares the data set is split into (default: --local-clients, else 4)", minimum=1,
        derive=lambda v: v.get("local_clients") or 4, resume=True))
    rotations: bool = field(default=True, metadata=setting(
        "omniglot: do not add 90/180/270-degree rotations as extra classes", invert=True, resume=True))
    # eval_every carves Omniglot's validation classes out of the training ones: resumes must match.
    eval_every: int = field(default=0, metadata=setting(
        "validate every this many rounds on held-out validation tasks (disjoint from the training and the final "
        "test classes), export the best-validation θ to model-best/; 0: never", minimum=0, resume=True))
    val_tasks_per_client: int = field(default=20, metadata=setting(
        "validation tasks each sampled client adapts on (with --eval-every)", minimum=1))
    # None: `ways` (set in __post_init__).
    eval_ways: int | None = field(default=None, metadata=setting(
        "classes per held-out task in the final evaluation (default: --ways); protonet, matchingnet and "
        "relationnet may test with other ways than they trained with, models with a head need --ways", minimum=2, maximum=1000,
        derive=lambda v: v["ways"], resume=True))
    # The first held-out tasks per client, whose adaptation curve is measured; 0: no curve.
    eval_curve_tasks: int = field(default=10, metadata=setting(
        "held-out tasks per client on which the adaptation curve (the metric after each step) is measured; it "
        "costs a query pass per step, so not on all of them (0: no curve)", minimum=0))
    # None (0 on the wire, from a coordinator before --clusters): 1, set in __post_init__.
    clusters: int | None = field(default=None, metadata=setting(
        "meta-parameter sets learned, one per cluster of clients whose tasks pull apart (IFCA): each client "
        "trains the cluster whose θ adapts best on its support set; the broadcast and every update are this "
        "many times one θ (default: 1, no clusters)", minimum=1, maximum=64, derive=lambda v: 1, resume=True))
    # The round schedule (server/buffered.py): sync rounds, or FedBuff's buffered asynchronous ones.
    schedule: str = field(default="sync", metadata=setting(
        "sync: rounds of sampled clients, each closed before the next; buffered: free clients train at once "
        "against the current θ, an outer step every --buffer-size accepted updates, each weighted "
        "(1 + staleness)^-a (FedBuff, Nguyen et al. 2022)", choices=SCHEDULES, resume=True))
    buffer_size: int = field(default=2, metadata=setting(
        "buffered: accepted updates per outer step (K)", minimum=1, maximum=100000))
    staleness_exponent: float = field(default=0.5, metadata=setting(
        "buffered: an update tau versions behind weighs (1 + tau)^-a, a this exponent (0: no discount)",
        minimum=0.0, maximum=16.0))
    max_staleness: int = field(default=16, metadata=setting(
        "buffered: an update more than this many versions behind is refused (FAILED_PRECONDITION, STALE_VERSION; "
        "the client trains again on the current θ)", minimum=0, maximum=100000))
    # Then the algorithms' own settings (ALGORITHM_OPTIONS), as fields.

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any: ...  # the algorithms' options, added by with_options

    def __post_init__(self) -> None:
        check_fields(self)
        if self.eval_ways is None:
            object.__setattr__(self, "eval_ways", self.ways)
        if self.clusters is None:
            object.__setattr__(self, "clusters", 1)
        algorithm = ALGORITHMS[self.algorithm]
        if algorithm.check is not None:
            algorithm.check(self)
        if is_classification(self.task) and self.eval_ways != self.ways and algorithm.predict is None:
            raise ValueError(f"--eval-ways {self.eval_ways}: {self.algorithm} adapts a head with --ways "
                             f"{self.ways} outputs, one per class, so it is tested {self.ways}-way; only "
                             "the metric-based algorithms (protonet, matchingnet, relationnet: no head) can test with "
                             "other ways than they train with")
        if self.schedule == "buffered" and self.algorithm == "mamlpp":
            # MAML++ anneals its multi-step loss and first-order warm-up by the round a client is given;
            # a buffered assignment's number is not an outer step, so those schedules would be wrong.
            raise ValueError("--schedule buffered: mamlpp's per-round schedules (--first-order-rounds, --msl) "
                             "need synchronous rounds; use --schedule sync or another algorithm")
        _check_work(self)


def run_settings() -> tuple[Setting, ...]:
    """The run's settings in flag order: RunConfig's fields (--norm after --model), then the algorithms'."""
    out: list[Setting] = []
    for s in settings_of(RunConfig):
        out.append(s)
        if s.name == "model":
            out.append(NORM)
    return tuple(out)


def _check_work(run: RunConfig) -> None:
    """Refuse settings that would make a client allocate or compute without bound."""
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
