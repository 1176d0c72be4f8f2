"""fedmeta-sim's settings and plan: which virtual clients each Ray actor hosts, what it asks Ray for.

Pure code (no Ray, no network): client/sim.py puts it to work. A virtual client is an ordinary
client id (`<prefix>-<i>`) with the data seed and shard a real client `i` gets from
`fedmeta-server --local-clients` (server/local.py: seed i, shard i mod the run's --shards), so a
simulated federation partitions the data exactly like a federation of processes.

Memory per actor (Ray's `memory` resource, so Ray packs second-order clients less densely):

    bytes = BASE + hosted x (PER_CLIENT + HOLD x P) + concurrency x (a + b x inner_steps) x P

with P the run's meta-parameter bytes (float32), BASE the actor process (Python, torch, Ray's core
worker), PER_CLIENT what a hosted client costs whatever the model (its thread, Worker, module and
task sampler: measured 0.5 MiB, 500 sinusoid clients per actor at 565 MiB RSS against 570 MiB
estimated), HOLD = 2 (each hosted client keeps its model and the last θ it fetched), and (a, b) the algorithm's factor (STEP_FACTORS): a first-order step holds
a few copies of P whatever its step count; a second-order one keeps every inner step's adapted
parameters and gradients in the graph it differentiates through. Activations scale with the
meta-batch, not P, and are not in it: --memory-per-actor-mb overrides the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedmeta.common.config import check_client_id
from fedmeta.common.settings import check_fields, setting

MIB = 1 << 20
BASE_BYTES = 320 * MIB  # one actor process: Python, torch, Ray's core worker, gRPC
PER_CLIENT_BYTES = MIB // 2
HOLD = 2
# (a, b): a client step holds about (a + b x inner_steps) copies of the meta-parameters at its peak.
STEP_FACTORS: dict[str, tuple[int, int]] = {
    "fedavg": (3, 0), "reptile": (3, 0), "protonet": (3, 0), "matchingnet": (3, 0), "relationnet": (3, 0),
    "fomaml": (4, 0), "perfedavg": (5, 0),
    "anil": (4, 1), "maml": (4, 3), "mamlpp": (4, 3), "metasgd": (5, 3), "metacurvature": (5, 3),
}
SECOND_ORDER = frozenset({"maml", "mamlpp", "metasgd", "metacurvature", "anil"})


def _server(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"--server: expected HOST:PORT with a port from 1 to 65535, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """fedmeta-sim's flags (client/sim.py derives its parser from this metadata)."""

    server: str = field(metadata=setting("the coordinator's address (a normal `python -m fedmeta.server`)",
                                         metavar="HOST:PORT", required=True))
    ray_address: str = field(default="local", metadata=setting(
        "Ray cluster to join (ray://HOST:PORT or HOST:PORT of its head, auto for RAY_ADDRESS); local starts a "
        "Ray on this machine", metavar="ADDRESS"))
    virtual_clients: int = field(default=100, metadata=setting("virtual clients in all", minimum=1,
                                                               maximum=1_000_000))
    clients_per_round: int = field(default=10, metadata=setting(
        "clients the coordinator samples per round (its own --clients-per-round): sizes each actor's compute "
        "slots", minimum=1))
    actors: int = field(default=0, metadata=setting(
        "Ray actors hosting the virtual clients (0: as many as the cluster's CPUs, or GPUs with "
        "--gpus-per-actor, allow, at most --virtual-clients)", minimum=0))
    cpus_per_actor: float = field(default=1.0, metadata=setting("CPUs each actor reserves", positive=True))
    gpus_per_actor: float = field(default=0.0, metadata=setting(
        "GPUs each actor reserves, a fraction (0.25: four actors share a GPU) or a whole number; with any, the "
        "virtual clients compute on cuda", minimum=0.0))
    memory_per_actor_mb: int = field(default=0, metadata=setting(
        "memory each actor reserves, in MiB (0: the estimate from the model and the algorithm)", minimum=0))
    concurrency_per_actor: int = field(default=0, metadata=setting(
        "virtual clients of one actor computing at once, the others queue (0: ceil(--clients-per-round / "
        "--actors))", minimum=0))
    id_prefix: str = field(default="vc", metadata=setting("virtual client ids are <prefix>-<index>"))
    first_index: int = field(default=0, metadata=setting(
        "index of the first virtual client (several fedmeta-sim on one coordinator: disjoint ranges)", minimum=0))
    actor_restarts: int = field(default=10, metadata=setting(
        "times a dead actor is replaced (its virtual clients rejoin) before its clients are given up", minimum=0))
    give_up_s: float = field(default=300.0, metadata=setting(
        "seconds to keep retrying an unreachable coordinator before exiting 1", positive=True))
    tls_ca: str | None = field(default=None, metadata=setting(
        "CA certificate to verify the coordinator with (a path valid on every node); enables TLS", metavar="PEM"))
    report: str | None = field(default=None, metadata=setting(
        "write the run's report (placement, updates by node, the accepted-update ledger) here as JSON",
        metavar="FILE"))

    def __post_init__(self) -> None:
        check_fields(self)
        _server(self.server)
        if not self.ray_address.strip():
            raise ValueError("--ray-address: expected an address, auto or local, got ''")
        if self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            raise ValueError(f"--gpus-per-actor: above 1 it must be a whole number (Ray's rule), got "
                             f"{self.gpus_per_actor:g}")
        if self.actors > self.virtual_clients:
            raise ValueError(f"--actors: {self.actors} actors for {self.virtual_clients} virtual clients; give at "
                             "most --virtual-clients")
        try:
            check_client_id(client_id(self, self.virtual_clients - 1))
        except ValueError as exc:
            raise ValueError(f"--id-prefix: {exc}") from None


def client_id(config: SimConfig, offset: int) -> str:
    return f"{config.id_prefix}-{config.first_index + offset}"


@dataclass(frozen=True)
class VirtualClient:
    """One virtual client: its id and the data seed and shard a local client of that index gets."""

    client_id: str
    data_seed: int
    shard: int


def virtual_clients(config: SimConfig) -> list[VirtualClient]:
    return [VirtualClient(client_id(config, i), config.first_index + i, config.first_index + i)
            for i in range(config.virtual_clients)]


def actor_count(config: SimConfig, cluster: dict[str, float]) -> int:
    """--actors, else as many as the cluster's CPUs (GPUs, with --gpus-per-actor) hold; ValueError if none fit."""
    if config.actors:
        return config.actors
    fits = math.floor(cluster.get("CPU", 0.0) / config.cpus_per_actor + 1e-9)
    if config.gpus_per_actor > 0:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / config.gpus_per_actor + 1e-9))
    if fits < 1:
        what = "GPU" if config.gpus_per_actor > 0 and cluster.get("GPU", 0.0) < config.gpus_per_actor else "CPU"
        raise ValueError(f"--{what.lower()}s-per-actor: the cluster has {cluster.get(what, 0.0):g} {what}s, not "
                         "enough for one actor")
    return min(fits, config.virtual_clients)


def split(clients: list[VirtualClient], actors: int) -> list[list[VirtualClient]]:
    """Contiguous, near-equal shares: actor k hosts clients [k*n/actors, (k+1)*n/actors)."""
    n = len(clients)
    return [clients[k * n // actors:(k + 1) * n // actors] for k in range(actors)]


def concurrency(config: SimConfig, actors: int) -> int:
    return config.concurrency_per_actor or max(1, math.ceil(config.clients_per_round / actors))


@dataclass(frozen=True)
class Estimate:
    """An actor's memory: the parts of the formula in the module docstring, in bytes."""

    algorithm: str
    parameters: int  # meta-parameters (elements)
    hosted: int
    concurrency: int
    step_copies: int  # a + b x inner_steps

    @property
    def hold_bytes(self) -> int:
        return self.hosted * (PER_CLIENT_BYTES + HOLD * 4 * self.parameters)

    @property
    def step_bytes(self) -> int:
        return self.concurrency * self.step_copies * 4 * self.parameters

    @property
    def total_bytes(self) -> int:
        return BASE_BYTES + self.hold_bytes + self.step_bytes

    def describe(self) -> str:
        order = "second order" if self.algorithm in SECOND_ORDER else "first order"
        return (f"{self.algorithm} ({order}): {self.parameters:,} meta-parameters; {self.total_bytes / MIB:.0f} MiB "
                f"per actor = {BASE_BYTES // MIB} MiB base + {self.hosted} hosted x (0.5 MiB + {HOLD} copies) "
                f"({self.hold_bytes / MIB:.1f} MiB) + {self.concurrency} computing x {self.step_copies} copies "
                f"({self.step_bytes / MIB:.1f} MiB)")


def estimate(algorithm: str, parameters: int, inner_steps: int, *, hosted: int, computing: int) -> Estimate:
    a, b = STEP_FACTORS.get(algorithm, (5, 3))  # an algorithm not in the table: as a second-order one
    return Estimate(algorithm, parameters, hosted, computing, a + b * max(1, inner_steps))
