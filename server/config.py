"""The coordinator's configuration: one option table drives the CLI flags, the TOML file and validation."""

from __future__ import annotations

import argparse
import math
import re
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from common.aggregation import AGGREGATORS
from common.algorithms import ALGORITHMS, get_algorithm
from common.codec import DEFAULT_CHUNK_BYTES, ENCODINGS
from common.config import RunConfig, check_client_id
from common.models import NORMS, ZOO, default_model
from common.net import is_loopback
from common.tasks import PARTITIONS, TASK_DEFAULTS, TASKS


@dataclass(frozen=True)
class Option:
    """One setting: its flag, type, default, allowed values and help text."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("algorithm", str, "maml", "meta-learning algorithm", choices=tuple(sorted(ALGORITHMS))),
    Option("task", str, "sinusoid", "task family: sinusoid regression, gaussian or omniglot classification",
           choices=tuple(sorted(TASKS))),
    Option("model", str, None, "model (default: mlp for sinusoid and gaussian, conv4 for omniglot)",
           choices=tuple(sorted(ZOO))),
    Option("norm", str, None,
           "conv4's normalisation: support (default; batch norm with the support set's statistics, queries "
           "predicted one by one), group or layer (per example), batch (each batch's own statistics: "
           "transductive, a prediction depends on the other queries)", choices=NORMS),
    Option("ways", int, 5, "classes per classification task (N in N-way)", minimum=2, maximum=1000),
    Option("dim", int, 16, "gaussian: input dimension", minimum=1, maximum=100000),
    Option("partition", str, "alphabet",
           "omniglot: how classes are split among clients (alphabet: whole alphabets, non-IID)", choices=PARTITIONS),
    Option("shards", int, None, "shares the data set is split into (default: --local-clients, else 4)", minimum=1),
    Option("no_rotations", bool, False, "omniglot: do not add 90/180/270-degree rotations as extra classes"),
    Option("first_order_rounds", int, 0, "mamlpp: rounds trained first order before second order", minimum=0),
    Option("no_msl", bool, False, "mamlpp: no multi-step loss (only the last inner step's query loss)"),
    Option("no_lslr", bool, False, "mamlpp: no learned per-layer per-step inner learning rates"),
    Option("no_cosine_outer", bool, False, "mamlpp: constant outer learning rate instead of cosine annealing"),
    Option("local_steps", int, 5, "perfedavg and fedavg: local steps (passes over the meta-batch for fedavg)",
           minimum=1),
    Option("local_lr", float, 0.01, "perfedavg and fedavg: local learning rate (Per-FedAvg's beta)", minimum=0.0),
    Option("perfedavg_variant", str, "fo", "perfedavg: fo (first order) or hf (Hessian-vector product)",
           choices=("fo", "hf")),
    Option("data_dir", str, None, "omniglot: data folder for --local-clients (clients take their own --data-dir)"),
    Option("download", bool, False,
           "omniglot: first fetch the official archives into --data-dir when missing (nothing is downloaded "
           "without it)"),
    Option("mode", str, "federated",
           "federated: serve clients over gRPC; centralized: the same algorithm and tasks in this process, "
           "the task samplers of --local-clients (else --clients-per-round) clients pooled",
           choices=("federated", "centralized")),
    Option("rounds", int, 1500, "training rounds (outer steps)", minimum=1),
    Option("clients_per_round", int, None, "clients sampled per round (default: --local-clients, else 4)", minimum=1),
    Option("min_clients", int, 1, "answers needed to close a round at its deadline", minimum=1),
    Option("round_deadline_s", float, 30.0, "seconds a round waits for its sampled clients", minimum=0.05),
    Option("tasks_per_client", int, 10, "tasks each sampled client trains on per round (its meta-batch)", minimum=1),
    Option("shots", int, 5, "support examples per task (K in K-shot)", minimum=1),
    Option("queries", int, None, "query examples per task, per class for classification "
           "(default: 10; 15 for omniglot)", minimum=1),
    Option("inner_steps", int, 1, "inner-loop SGD steps in training", minimum=0),
    Option("inner_lr", float, None, "inner-loop learning rate (default: 0.01 for sinusoid, 0.4 for classification)",
           minimum=0.0),
    Option("outer_lr", float, None, "outer learning rate (default: Adam 3e-3 for maml, fomaml, metasgd, anil, mamlpp; 1e-3 for "
           "protonet; 1.0 for reptile (annealed), perfedavg and fedavg (averaging))", minimum=0.0),
    Option("eval_shots", int, None, "support examples per held-out task in the final evaluation (default: --shots)",
           minimum=1),
    Option("eval_ways", int, None, "classes per held-out task in the final evaluation (default: --ways); "
           "protonet may test with other ways than it trained with, models with a head need --ways",
           minimum=2, maximum=1000),
    Option("eval_queries", int, None, "query examples per held-out task (per class) in the final evaluation "
           "(default: 100 for sinusoid, 20 for gaussian, 15 for omniglot)", minimum=1),
    Option("eval_steps", int, None, "adaptation steps in the final evaluation (default: 10; --inner-steps for "
           "metasgd and mamlpp, whose step sizes are learned for that many)", minimum=0),
    Option("eval_curve_tasks", int, 10,
           "held-out tasks per client on which the adaptation curve (the metric after each step) is measured; "
           "it costs a query pass per step, so not on all of them (0: no curve)", minimum=0),
    Option("eval_tasks_per_client", int, 150, "held-out tasks each client adapts on in the final evaluation (4 clients: 600)", minimum=1),
    Option("eval_every", int, 0, "validate every this many rounds on held-out validation tasks (disjoint from "
           "the training and the final test classes), export the best-validation θ to model-best/; 0: never",
           minimum=0),
    Option("val_tasks_per_client", int, 20, "validation tasks each sampled client adapts on (with --eval-every)",
           minimum=1),
    Option("seed", int, 0, "run seed: model init, client sampling, task streams", minimum=0),
    Option("encoding", str, "float32", "transport encoding of floating-point tensors", choices=ENCODINGS),
    Option("chunk_bytes", int, DEFAULT_CHUNK_BYTES, "payload bytes per stream chunk", minimum=1024, maximum=3 << 20),
    Option("poll_timeout_s", float, 10.0, "seconds the server holds a WaitForAssignment long-poll", minimum=0.05, maximum=600),
    Option("aggregator", str, "mean",
           "how a round's updates combine: mean and clipped-mean stream in O(model) memory; median and "
           "trimmed-mean keep every update of the round (memory: clients x model) and ignore weights",
           choices=AGGREGATORS),
    Option("max_update_norm", float, None,
           "L2 bound on an update: clipped-mean scales larger ones down to it, the other aggregators refuse them",
           minimum=0.0),
    Option("trim_fraction", float, 0.2, "trimmed-mean: fraction of updates dropped at each end, per coordinate",
           minimum=0.0, maximum=0.49),
    Option("norm_clip_factor", float, 10.0,
           "scale down an update whose L2 norm is over this many times the median norm of the last "
           "--norm-clip-window accepted updates (a finite but huge update would otherwise wreck theta or "
           "freeze Adam); 0 turns it off", minimum=0.0),
    Option("norm_clip_window", int, 64, "how many recently accepted update norms --norm-clip-factor's median "
           "is taken over", minimum=1),
    Option("norm_clip_warmup", int, 5, "accepted updates before --norm-clip-factor applies (until then only "
           "the hard bound of 1e18 per value does)", minimum=1),
    Option("max_update_bytes", int, 1 << 31, "largest update payload accepted, in bytes", minimum=1),
    Option("max_concurrent_uploads", int, 2, "updates buffered at once (peak memory: this many model copies)", minimum=1),
    Option("checkpoint_every", int, 1, "write a checkpoint every this many rounds", minimum=1),
    Option("keep_checkpoints", int, 2, "checkpoints kept; a resume that finds the newest corrupt or "
           "non-finite falls back to the one before", minimum=1, maximum=1000),
    Option("host", str, "127.0.0.1", "address to bind (0.0.0.0 for every interface)"),
    Option("port", int, None, "port to bind, 0 picks a free one (default: 50051; with --local-clients, a free one)", minimum=0, maximum=65535),
    Option("max_workers", int, 64, "gRPC worker threads: long-polls may hold half, update and parameter streams a "
           "quarter, the rest stays free for Join, Heartbeat and Leave", minimum=4),
    Option("max_concurrent_rpcs", int, 1024, "RPCs in flight or queued at once; more are refused with "
           "RESOURCE_EXHAUSTED, which clients retry after a backoff", minimum=8),
    Option("stream_idle_s", float, 5.0, "an update or parameter stream that moves no message for this long is "
           "cancelled and its thread and upload slot freed; keep it above the time one --chunk-bytes chunk takes "
           "on the slowest client's link (1 MiB in 5 s: 1.7 Mbit/s)", minimum=0.1, maximum=600),
    Option("max_connection_idle_s", float, 300.0, "a connection with no RPC for this long is closed (clients "
           "reconnect by themselves)", minimum=1.0),
    Option("max_connection_age_s", float, 3600.0, "a connection older than this is closed after its RPCs end "
           "(grace: 2 x --poll-timeout-s + 30 s; clients reconnect by themselves)", minimum=1.0),
    Option("max_clients", int, 10000, "registered clients at most; a Join beyond it is refused with "
           "RESOURCE_EXHAUSTED (left and long-silent clients are forgotten first)", minimum=1),
    Option("allowed_clients", str, None, "file of client ids allowed to join, one per line (# comments); "
           "others are refused with PERMISSION_DENIED"),
    Option("joins_per_s", float, 10.0, "Join calls per second per peer address (bursts of 10 s worth); more "
           "are refused with RESOURCE_EXHAUSTED", minimum=0.01),
    Option("forget_client_s", float, 600.0, "a client silent this long (no call) is removed from the registry; "
           "it rejoins by itself if it comes back", minimum=1.0),
    Option("max_silent_rounds", int, 3, "a client sampled and silent in this many rounds in a row is not "
           "sampled again for a while (3 rounds, doubling at each repeat)", minimum=1),
    Option("run_dir", str, None, "run directory (default: runs/<algorithm>-<task>-<time>); an existing one resumes"),
    Option("local_clients", int, 0, "also start this many client processes on 127.0.0.1", minimum=0),
    Option("local_device", str, "cpu", "device of the --local-clients: cpu, cuda or cuda:N (every client on that "
           "GPU), or cuda:all (client i on GPU i mod the GPUs visible)"),
    Option("tls_cert", str, None, "server certificate chain (PEM file); with --tls-key, serves TLS"),
    Option("tls_key", str, None, "server private key (PEM file)"),
    Option("tls_ca", str, None, "CA certificate (PEM file) that client certificates must chain to"),
    Option("require_client_cert", bool, False,
           "mutual TLS: a client must present a certificate whose CN or DNS SAN is its client id"),
    Option("tokens_file", str, None, "per-client tokens (salted hashes, see fedmeta-tokens): every call must carry one"),
    Option("insecure", bool, False, "allow a non-loopback --host without TLS (plaintext on the network)"),
    Option("no_reflection", bool, False,
           "do not serve gRPC server reflection (it tells any caller the service names and the proto schema)"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the coordinator needs, resolved and validated."""

    run: RunConfig
    rounds: int
    clients_per_round: int
    min_clients: int
    round_deadline_s: float
    outer_lr: float
    max_update_bytes: int
    max_concurrent_uploads: int
    aggregator: str
    checkpoint_every: int
    host: str
    port: int
    max_workers: int
    run_dir: Path
    local_clients: int
    data_dir: str | None = None
    download: bool = False
    mode: str = "federated"
    keep_checkpoints: int = 2
    local_device: str = "cpu"
    max_update_norm: float | None = None
    trim_fraction: float = 0.2
    norm_clip_factor: float = 10.0
    norm_clip_window: int = 64
    norm_clip_warmup: int = 5
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tokens_file: str | None = None
    require_client_cert: bool = False
    insecure: bool = False
    no_reflection: bool = False
    max_concurrent_rpcs: int = 1024
    stream_idle_s: float = 5.0
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 3600.0
    max_clients: int = 10000
    allowed_clients: str | None = None
    joins_per_s: float = 10.0
    forget_client_s: float = 600.0
    max_silent_rounds: int = 3

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def check_value(option: Option, value: Any) -> Any:
    """Coerce and validate one value; raise ValueError naming the flag."""
    if value is None:
        if option.default is None:
            return None
        raise ValueError(f"{option.flag}: a value is required")
    expected = option.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ValueError(f"{option.flag}: expected {expected.__name__}, got {value!r}")
    if option.choices is not None and value not in option.choices:
        raise ValueError(f"{option.flag}: expected one of {', '.join(option.choices)}; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{option.flag}: expected a finite number, got {value!r}")
    number: Any = value
    if option.minimum is not None and number < option.minimum:
        raise ValueError(f"{option.flag}: expected a value >= {option.minimum:g}, got {value!r}")
    if option.maximum is not None and number > option.maximum:
        raise ValueError(f"{option.flag}: expected a value <= {option.maximum:g}, got {value!r}")
    return value


def load_toml(path: Path) -> dict[str, Any]:
    """Read a flat TOML config whose keys are option names (flags with '_' for '-')."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _BY_NAME:
            raise ValueError(f"--config: {path}: unknown key {key!r}; allowed: {', '.join(sorted(_BY_NAME))}")
        try:
            values[name] = check_value(_BY_NAME[name], value)
        except ValueError as exc:
            raise ValueError(f"--config: {path}: {exc}") from None
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file of settings (keys as below, with _); flags override it")
    for o in OPTIONS:
        if o.type is bool:
            parser.add_argument(o.flag, action="store_true", default=None, help=o.help)
            continue
        default = "" if o.default is None else f" (default: {o.default})"
        parser.add_argument(
            o.flag,
            type=str,
            default=None,
            metavar=o.type.__name__.upper() if o.choices is None else "{" + ",".join(o.choices) + "}",
            help=o.help + default,
        )


def _parse_flag(option: Option, text: str) -> Any:
    try:
        value = option.type(text)
    except ValueError:
        raise ValueError(f"{option.flag}: expected {option.type.__name__}, got {text!r}") from None
    return check_value(option, value)


def resolve(args: argparse.Namespace) -> ServerConfig:
    """Defaults, then the TOML file, then flags; validated into a ServerConfig."""
    values = {o.name: o.default for o in OPTIONS}
    if args.config is not None:
        values.update(load_toml(args.config))
    for o in OPTIONS:
        text = getattr(args, o.name)
        if text is True:
            values[o.name] = True
        elif text is not None:
            values[o.name] = _parse_flag(o, text)
    return build(values)


def build(values: dict[str, Any]) -> ServerConfig:
    """A ServerConfig from option values (missing ones take their defaults)."""
    v = {o.name: o.default for o in OPTIONS} | values
    for name, value in v.items():
        if name not in _BY_NAME:
            raise ValueError(f"unknown setting {name!r}")
        check_value(_BY_NAME[name], value)
    algorithm = get_algorithm(v["algorithm"])
    for name, value in TASK_DEFAULTS[v["task"]].items():
        if v[name] is None:
            v[name] = value
    if v["eval_shots"] is None:
        v["eval_shots"] = v["shots"]
    if v["eval_ways"] is None:
        v["eval_ways"] = v["ways"]
    if v["eval_steps"] is None:
        v["eval_steps"] = v["inner_steps"] if algorithm.learned_steps else 10
    clients_per_round = v["clients_per_round"] or v["local_clients"] or 4
    if v["min_clients"] > clients_per_round:
        raise ValueError(f"--min-clients: expected at most --clients-per-round ({clients_per_round}), got {v['min_clients']}")
    run_dir = Path(v["run_dir"] or f"runs/{v['algorithm']}-{v['task']}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = RunConfig(
        run_id=run_dir.resolve().name,
        algorithm=v["algorithm"],
        task=v["task"],
        shots=v["shots"],
        queries=v["queries"],
        tasks_per_client=v["tasks_per_client"],
        inner_steps=v["inner_steps"],
        inner_lr=v["inner_lr"],
        seed=v["seed"],
        encoding=v["encoding"],
        chunk_bytes=v["chunk_bytes"],
        eval_shots=v["eval_shots"],
        eval_ways=v["eval_ways"],
        eval_steps=v["eval_steps"],
        eval_tasks_per_client=v["eval_tasks_per_client"],
        eval_curve_tasks=v["eval_curve_tasks"],
        eval_queries=v["eval_queries"],
        poll_timeout_s=v["poll_timeout_s"],
        rounds=v["rounds"],
        model=default_model(v["task"], ways=v["ways"], dim=v["dim"], name=v["model"], algorithm=v["algorithm"],
                            norm=v["norm"]),
        ways=v["ways"],
        dim=v["dim"],
        partition=v["partition"],
        shards=v["shards"] or v["local_clients"] or 4,
        rotations=not v["no_rotations"],
        first_order_rounds=v["first_order_rounds"],
        msl=not v["no_msl"],
        lslr=not v["no_lslr"],
        cosine_outer=not v["no_cosine_outer"],
        local_steps=v["local_steps"],
        local_lr=v["local_lr"],
        perfedavg_variant=v["perfedavg_variant"],
        eval_every=v["eval_every"],
        val_tasks_per_client=v["val_tasks_per_client"],
    )
    if not re.fullmatch(r"cpu|cuda(:[0-9]{1,3}|:all)?", v["local_device"]):
        raise ValueError(f"--local-device: expected cpu, cuda, cuda:N or cuda:all, got {v['local_device']!r}")
    if v["download"] and v["data_dir"] is None:
        raise ValueError("--download: needs --data-dir, the folder to put the Omniglot archives in")
    if v["data_dir"] is not None and not v["download"] and not Path(v["data_dir"]).is_dir():
        raise ValueError(f"--data-dir: no such directory: {v['data_dir']}")
    if v["task"] == "omniglot" and v["local_clients"] and v["data_dir"] is None:
        raise ValueError("--task omniglot: --local-clients need --data-dir, the folder holding the Omniglot "
                         "archives (images_background*.zip, images_evaluation.zip) or their extracted trees")
    if v["inner_lr"] <= 0:
        raise ValueError(f"--inner-lr: expected a positive number, got {v['inner_lr']!r}")
    outer_lr = algorithm.default_outer_lr if v["outer_lr"] is None else v["outer_lr"]
    if outer_lr <= 0:
        raise ValueError(f"--outer-lr: expected a positive number, got {outer_lr!r}")
    _check_transport(v)
    if v["allowed_clients"] is not None:
        read_allowed_clients(Path(v["allowed_clients"]))
    if v["aggregator"] == "clipped-mean" and not v["max_update_norm"]:
        raise ValueError("--aggregator clipped-mean: needs a positive --max-update-norm to clip to")
    if 0 < v["norm_clip_factor"] < 1:
        raise ValueError(f"--norm-clip-factor: expected 0 (off) or at least 1, got {v['norm_clip_factor']!r}")
    if v["norm_clip_warmup"] > v["norm_clip_window"]:
        raise ValueError(f"--norm-clip-warmup: expected at most --norm-clip-window ({v['norm_clip_window']}), "
                         f"got {v['norm_clip_warmup']}")
    return ServerConfig(
        aggregator=v["aggregator"],
        max_update_norm=v["max_update_norm"],
        trim_fraction=v["trim_fraction"],
        norm_clip_factor=v["norm_clip_factor"],
        norm_clip_window=v["norm_clip_window"],
        norm_clip_warmup=v["norm_clip_warmup"],
        tls_cert=v["tls_cert"],
        tls_key=v["tls_key"],
        tls_ca=v["tls_ca"],
        tokens_file=v["tokens_file"],
        require_client_cert=v["require_client_cert"],
        insecure=v["insecure"],
        no_reflection=v["no_reflection"],
        max_concurrent_rpcs=v["max_concurrent_rpcs"],
        stream_idle_s=v["stream_idle_s"],
        max_connection_idle_s=v["max_connection_idle_s"],
        max_connection_age_s=v["max_connection_age_s"],
        max_clients=v["max_clients"],
        allowed_clients=v["allowed_clients"],
        joins_per_s=v["joins_per_s"],
        forget_client_s=v["forget_client_s"],
        max_silent_rounds=v["max_silent_rounds"],
        run=run,
        rounds=v["rounds"],
        clients_per_round=clients_per_round,
        min_clients=v["min_clients"],
        round_deadline_s=v["round_deadline_s"],
        outer_lr=outer_lr,
        max_update_bytes=v["max_update_bytes"],
        max_concurrent_uploads=v["max_concurrent_uploads"],
        checkpoint_every=v["checkpoint_every"],
        keep_checkpoints=v["keep_checkpoints"],
        local_device=v["local_device"],
        host=v["host"],
        port=(0 if v["local_clients"] else 50051) if v["port"] is None else v["port"],
        max_workers=v["max_workers"],
        run_dir=run_dir,
        local_clients=v["local_clients"],
        data_dir=v["data_dir"],
        download=v["download"],
        mode=v["mode"],
    )


def read_allowed_clients(path: Path) -> frozenset[str]:
    """The client ids in an --allowed-clients file: one per line; blank lines and # comments ignored."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--allowed-clients: cannot read {path}: {exc}") from None
    ids = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            check_client_id(entry)
        except ValueError as exc:
            raise ValueError(f"--allowed-clients: {path} line {number}: {exc}") from None
        ids.add(entry)
    if not ids:
        raise ValueError(f"--allowed-clients: {path} names no client id; every Join would be refused")
    return frozenset(ids)


def _check_transport(v: dict[str, Any]) -> None:
    """TLS settings must be complete and readable; plaintext beyond loopback must be asked for."""
    if (v["tls_cert"] is None) != (v["tls_key"] is None):
        raise ValueError("--tls-cert and --tls-key: give both or neither")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        if v[name] is not None and not Path(v[name]).is_file():
            raise ValueError(f"--{name.replace('_', '-')}: no such file: {v[name]}")
    if v["tls_ca"] is not None and v["tls_cert"] is None:
        raise ValueError("--tls-ca: needs --tls-cert and --tls-key (the server must serve TLS to check client certificates)")
    if v["require_client_cert"] and v["tls_ca"] is None:
        raise ValueError("--require-client-cert: needs --tls-ca, the CA that client certificates must chain to")
    if v["require_client_cert"] and v["local_clients"]:
        raise ValueError("--require-client-cert: --local-clients have no certificates; start clients with "
                         "fedmeta-client --tls-cert/--tls-key instead")
    if v["tokens_file"] is not None:
        from server.auth import parse_tokens_file

        parse_tokens_file(Path(v["tokens_file"]))
        if v["local_clients"]:
            raise ValueError("--tokens-file: --local-clients have no tokens; start clients with "
                             "fedmeta-client --token-file instead")
    if v["tls_cert"] is not None and v["local_clients"] and v["tls_ca"] is None:
        raise ValueError("--local-clients with TLS: give --tls-ca too, so the local clients can verify the server")
    if v["tls_cert"] is None and not v["insecure"] and not is_loopback(v["host"]):
        raise ValueError(f"--host {v['host']}: serving beyond loopback without TLS exposes every update; "
                         "pass --tls-cert and --tls-key (see fedmeta-certs), or --insecure to accept plaintext")


def describe(config: ServerConfig) -> dict[str, Any]:
    """The settings as a JSON-friendly dict (for config.json, summary.json and resume checks)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "run":
            out.update({k: v for k, v in asdict(value).items() if k != "run_id"})  # model -> {name, kwargs}
        else:
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out
