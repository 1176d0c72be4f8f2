"""The coordinator's own settings (not sent to clients), declared once as ServerConfig field metadata.

Flags, TOML keys, validation and describe() come from these declarations (common/settings.py);
server/config.py puts them together with the run's settings (common/config.py RunConfig).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.config import RunConfig
from fedmeta.common.round_aggregator import ROUND_AGGREGATORS
from fedmeta.common.settings import Values, check_fields, setting


def _run_dir(v: Values) -> Path:
    return Path(v["run_dir"] or f"runs/{v['algorithm']}-{v['task']}-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the coordinator needs, resolved and validated."""

    run: RunConfig
    clients_per_round: int = field(metadata=setting(
        "clients sampled per round (default: --local-clients, else 4)", minimum=1,
        derive=lambda v: v["local_clients"] or 4))
    min_clients: int = field(metadata=setting("answers needed to close a round at its deadline", default=1,
                                              minimum=1))
    round_deadline_s: float = field(metadata=setting("seconds a round waits for its sampled clients", default=30.0,
                                                     minimum=0.05))
    outer_lr: float = field(metadata=setting(
        "outer learning rate (default: Adam 3e-3 for maml, fomaml, metasgd, anil, mamlpp; 1e-3 for protonet, "
        "matchingnet, relationnet; 1.0 for reptile (annealed), perfedavg and fedavg (averaging))", minimum=0.0, positive=True,
        derive=lambda v: ALGORITHMS[v["algorithm"]].default_outer_lr, resume=True))
    max_update_bytes: int = field(metadata=setting("largest update payload accepted, in bytes", default=1 << 31,
                                                   minimum=1))
    max_concurrent_uploads: int = field(metadata=setting(
        "updates buffered at once (peak memory: this many model copies)", default=2, minimum=1))
    malloc_mmap_threshold: int = field(metadata=setting(
        "glibc: allocations from this many bytes are mapped and given back when freed; fixing it stops freed "
        "megabyte buffers and gRPC's connection buffers piling up in per-thread arenas (server/memory.py); 0 "
        "leaves glibc's dynamic threshold; MALLOC_MMAP_THRESHOLD_ in the environment wins", default=65536,
        minimum=0))
    max_concurrent_downloads: int = field(metadata=setting(
        "parameter streams sending at once; the others wait (holding no thread and no memory) for a free one (peak "
        "memory: about 3 x --chunk-bytes each; raise it for many clients on slow links)", default=16, minimum=1))
    aggregator: str = field(metadata=setting(
        "how a round's updates combine: mean and clipped-mean stream in O(model) memory; median and trimmed-mean "
        "keep every update of the round (memory: clients x model) and ignore weights; task-aware weights each "
        "update by its tasks x max(0, cosine to the round's coordinate-wise median) (memory: clients x model); "
        "with --clusters, per cluster", default="mean", choices=ROUND_AGGREGATORS))
    cluster_warmup: int = field(metadata=setting(
        "--clusters: rounds the clusters train as one θ before the coordinator splits them by the direction of "
        "the clients' updates (then each client trains the cluster that adapts best; default: 10)", minimum=0,
        derive=lambda v: 10 if (v.get("clusters") or 1) > 1 else 0, resume=True))
    checkpoint_every: int = field(metadata=setting("write a checkpoint every this many rounds", default=1,
                                                   minimum=1))
    host: str = field(metadata=setting("address to bind (0.0.0.0 for every interface)", default="127.0.0.1"))
    port: int = field(metadata=setting(
        "port to bind, 0 picks a free one (default: 50051; with --local-clients, a free one)", minimum=0,
        maximum=65535, derive=lambda v: 0 if v["local_clients"] else 50051))
    max_workers: int = field(metadata=setting(
        "worker threads for the coordinator's O(model) work (decoding and adding updates, serialising θ) and "
        "the Admin calls; RPCs themselves are coroutines on one event loop, so a waiting client holds no "
        "thread", default=8, minimum=4))
    max_streams: int = field(metadata=setting(
        "update and parameter streams open at once (each holds at most a 64 KiB flow-control window of "
        "memory while it waits); more are refused with UNAVAILABLE and retried", default=2048, minimum=1))
    run_dir: Path = field(metadata=setting(
        "run directory (default: runs/<algorithm>-<task>-<time>); an existing one resumes", type=str,
        default=None, to_field=_run_dir))
    local_clients: int = field(metadata=setting("also start this many client processes on 127.0.0.1", default=0,
                                                minimum=0))
    data_dir: str | None = field(default=None, metadata=setting(
        "omniglot: data folder for --local-clients (clients take their own --data-dir)"))
    download: bool = field(default=False, metadata=setting(
        "omniglot: first fetch the official archives into --data-dir when missing (nothing is downloaded without "
        "it)"))
    mode: str = field(default="federated", metadata=setting(
        "federated: serve clients over gRPC; centralized: the same algorithm and tasks in this process, the task "
        "samplers of --local-clients (else --clients-per-round) clients pooled", choices=("federated", "centralized")))
    keep_checkpoints: int = field(default=2, metadata=setting(
        "checkpoints kept; a resume that finds the newest corrupt or non-finite falls back to the one before",
        minimum=1, maximum=1000))
    local_device: str = field(default="cpu", metadata=setting(
        "device of the --local-clients: cpu, cuda or cuda:N (every client on that GPU), or cuda:all (client i on "
        "GPU i mod the GPUs visible)"))
    max_update_norm: float | None = field(default=None, metadata=setting(
        "L2 bound on an update: clipped-mean scales larger ones down to it, the other aggregators refuse them",
        minimum=0.0))
    trim_fraction: float = field(default=0.2, metadata=setting(
        "trimmed-mean: fraction of updates dropped at each end, per coordinate", minimum=0.0, maximum=0.49))
    norm_clip_factor: float = field(default=10.0, metadata=setting(
        "scale down an update whose L2 norm is over this many times the median norm of the last --norm-clip-window "
        "accepted updates (a finite but huge update would otherwise wreck theta or freeze Adam); 0 turns it off",
        minimum=0.0))
    norm_clip_window: int = field(default=64, metadata=setting(
        "how many recently accepted update norms --norm-clip-factor's median is taken over", minimum=1))
    norm_clip_warmup: int = field(default=5, metadata=setting(
        "accepted updates before --norm-clip-factor applies (until then only the hard bound of 1e18 per value "
        "does)", minimum=1))
    tls_cert: str | None = field(default=None, metadata=setting(
        "server certificate chain (PEM file); with --tls-key, serves TLS"))
    tls_key: str | None = field(default=None, metadata=setting("server private key (PEM file)"))
    tls_ca: str | None = field(default=None, metadata=setting(
        "CA certificate (PEM file) that client certificates must chain to"))
    tokens_file: str | None = field(default=None, metadata=setting(
        "per-client tokens (salted hashes, see fedmeta-tokens): every call must carry one"))
    require_client_cert: bool = field(default=False, metadata=setting(
        "mutual TLS: a client must present a certificate whose CN or DNS SAN is its client id"))
    insecure: bool = field(default=False, metadata=setting(
        "allow a non-loopback --host without TLS (plaintext on the network)"))
    no_reflection: bool = field(default=False, metadata=setting(
        "do not serve gRPC server reflection (it tells any caller the service names and the proto schema)"))
    max_concurrent_rpcs: int = field(default=20000, metadata=setting(
        "RPCs in flight at once, waiting long-polls included (each a coroutine of a few kB, no thread: twice "
        "--max-clients by default); more are refused with RESOURCE_EXHAUSTED, which clients retry after a backoff",
        minimum=8))
    stream_idle_s: float = field(default=5.0, metadata=setting(
        "an update or parameter stream that moves no message for this long is cancelled and its thread and upload "
        "slot freed; keep it above the time one --chunk-bytes chunk takes on the slowest client's link (1 MiB in "
        "5 s: 1.7 Mbit/s)", minimum=0.1, maximum=600))
    max_connection_idle_s: float = field(default=300.0, metadata=setting(
        "a connection with no RPC for this long is closed (clients reconnect by themselves)", minimum=1.0))
    max_connection_age_s: float = field(default=3600.0, metadata=setting(
        "a connection older than this is closed after its RPCs end (grace: 2 x --poll-timeout-s + 30 s; clients "
        "reconnect by themselves)", minimum=1.0))
    max_clients: int = field(default=10000, metadata=setting(
        "registered clients at most; a Join beyond it is refused with RESOURCE_EXHAUSTED (left and long-silent "
        "clients are forgotten first)", minimum=1))
    allowed_clients: str | None = field(default=None, metadata=setting(
        "file of client ids allowed to join, one per line (# comments); others are refused with PERMISSION_DENIED"))
    joins_per_s: float = field(default=10.0, metadata=setting(
        "Join calls per second per peer address (bursts of 10 s worth); more are refused with RESOURCE_EXHAUSTED",
        minimum=0.01))
    forget_client_s: float = field(default=600.0, metadata=setting(
        "a client silent this long (no call) is removed from the registry; it rejoins by itself if it comes back",
        minimum=1.0))
    max_silent_rounds: int = field(default=3, metadata=setting(
        "a client sampled and silent in this many rounds in a row is not sampled again for a while (3 rounds, "
        "doubling at each repeat)", minimum=1))
    metrics_port: int | None = field(default=None, metadata=setting(
        "serve Prometheus metrics at http://--metrics-host:PORT/metrics (0 picks a free port; off by default; "
        "needs the metrics extra)", minimum=0, maximum=65535))
    metrics_host: str = field(default="127.0.0.1", metadata=setting(
        "address the metrics endpoint binds (0.0.0.0 for a Prometheus on another machine or container: anyone "
        "who reaches it reads the run's counters, plain HTTP)"))
    tensorboard: str | None = field(default=None, metadata=setting(
        "write TensorBoard event files (meta-loss, validation, evaluation curve, client compute) to this folder "
        "(needs the tensorboard extra)"))
    mlflow_uri: str | None = field(default=None, metadata=setting(
        "log the run's settings and metrics to MLflow at this tracking URI (file:DIR, http://HOST:PORT; needs the "
        "mlflow extra)"))

    admin_token_file: str | None = field(default=None, metadata=setting(
        "file holding the operator's admin token (one line, at least 32 characters; see README): turns on the Admin "
        "service (fedmeta-status, fedmeta-admin) and the dashboard's credential; it must differ from every client "
        "token"))
    admin_cert_name: str | None = field(default=None, metadata=setting(
        "with --require-client-cert: the CN or DNS SAN of the operator's client certificate, which may call the "
        "Admin service (no client may join under this id)"))
    dashboard_port: int | None = field(default=None, metadata=setting(
        "serve the live dashboard (HTML and /api/status) on this port; 0 picks a free one (default: off)",
        minimum=0, maximum=65535))
    dashboard_host: str = field(default="127.0.0.1", metadata=setting(
        "address the dashboard binds; beyond loopback it needs --admin-token-file (bearer token) and TLS or "
        "--insecure"))

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def rounds(self) -> int:
        return self.run.rounds

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
