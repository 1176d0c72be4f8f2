"""The coordinator's configuration: the declared settings drive the CLI flags, the TOML file and validation.

The settings are declared once: the run's in common/config.py (RunConfig, and each algorithm's
own in its module), the coordinator's own in server/options.py (ServerConfig); common/settings.py
derives the rest. This module reads flags and TOML files and checks what spans several settings.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from fedmeta.common.config import RunConfig, check_client_id, run_settings
from fedmeta.common.net import is_loopback
from fedmeta.common.settings import Setting, add_arguments as _add_settings, check_value, field_values, fill_defaults
from fedmeta.common.settings import parse_flag, resume_mismatches, settings_of
from fedmeta.server.options import ServerConfig

__all__ = ["OPTIONS", "ServerConfig", "add_arguments", "build", "check_value", "describe", "is_loopback",
           "load_toml", "read_allowed_clients", "resolve", "resume_differences"]

# Every flag and TOML key: the run's settings (sent to clients), then the coordinator's own.
OPTIONS: tuple[Setting, ...] = run_settings() + settings_of(ServerConfig)
_BY_NAME = {o.name: o for o in OPTIONS}


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
    _add_settings(parser, OPTIONS)


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
            values[o.name] = parse_flag(o, text)
    return build(values)


def build(values: dict[str, Any]) -> ServerConfig:
    """A ServerConfig from option values (missing ones take their defaults, per task and derived)."""
    for name, value in values.items():
        if name not in _BY_NAME:
            raise ValueError(f"unknown setting {name!r}")
    for o in OPTIONS:
        check_value(o, values.get(o.name, o.default))
    v = fill_defaults(OPTIONS, values)
    if v["min_clients"] > v["clients_per_round"]:
        raise ValueError(f"--min-clients: expected at most --clients-per-round ({v['clients_per_round']}), "
                         f"got {v['min_clients']}")
    server = field_values(ServerConfig, v)
    run = RunConfig(run_id=server["run_dir"].resolve().name, **field_values(RunConfig, v))
    if not re.fullmatch(r"cpu|cuda(:[0-9]{1,3}|:all)?", v["local_device"]):
        raise ValueError(f"--local-device: expected cpu, cuda, cuda:N or cuda:all, got {v['local_device']!r}")
    if v["download"] and v["data_dir"] is None:
        raise ValueError("--download: needs --data-dir, the folder to put the Omniglot archives in")
    if v["data_dir"] is not None and not v["download"] and not Path(v["data_dir"]).is_dir():
        raise ValueError(f"--data-dir: no such directory: {v['data_dir']}")
    if v["task"] == "omniglot" and v["local_clients"] and v["data_dir"] is None:
        raise ValueError("--task omniglot: --local-clients need --data-dir, the folder holding the Omniglot "
                         "archives (images_background*.zip, images_evaluation.zip) or their extracted trees")
    _check_transport(v)
    _check_admin(v)
    if v["allowed_clients"] is not None:
        read_allowed_clients(Path(v["allowed_clients"]))
    if v["aggregator"] == "clipped-mean" and not v["max_update_norm"]:
        raise ValueError("--aggregator clipped-mean: needs a positive --max-update-norm to clip to")
    _check_clusters(v, warmup_given=values.get("cluster_warmup") is not None)
    if 0 < v["norm_clip_factor"] < 1:
        raise ValueError(f"--norm-clip-factor: expected 0 (off) or at least 1, got {v['norm_clip_factor']!r}")
    if v["schedule"] == "buffered" and v["mode"] == "centralized":
        raise ValueError("--schedule buffered: needs --mode federated (a centralised run has no clients to wait for)")
    if v["schedule"] == "buffered" and (v["clusters"] or 1) > 1:
        raise ValueError("--schedule buffered: --clusters needs synchronous rounds (a split is decided on one round's "
                         "updates); use --schedule sync")
    if v["norm_clip_warmup"] > v["norm_clip_window"]:
        raise ValueError(f"--norm-clip-warmup: expected at most --norm-clip-window ({v['norm_clip_window']}), "
                         f"got {v['norm_clip_warmup']}")
    return ServerConfig(run=run, **server)


def _check_clusters(v: dict[str, Any], *, warmup_given: bool) -> None:
    """--clusters K combines with every --aggregator (each cluster's slice is aggregated by it) and the norm
    bounds (applied to each update as it arrives); these combinations make no sense and are refused."""
    k = v["clusters"] or 1
    if k == 1:
        if warmup_given:
            raise ValueError("--cluster-warmup: needs --clusters 2 or more")
        return
    if v["mode"] == "centralized":
        raise ValueError(f"--clusters {k}: only with --mode federated (clusters are groups of clients)")
    if v["clients_per_round"] < 2 * k:
        raise ValueError(f"--clusters {k}: needs --clients-per-round of at least {2 * k} (2 per cluster), "
                         f"got {v['clients_per_round']}; a split makes groups of at least 2 updates")
    if v["cluster_warmup"] >= v["rounds"]:
        raise ValueError(f"--cluster-warmup {v['cluster_warmup']}: expected fewer than --rounds "
                         f"({v['rounds']}), else the clusters never split")


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
        from fedmeta.server.auth import parse_tokens_file

        parse_tokens_file(Path(v["tokens_file"]))
        if v["local_clients"]:
            raise ValueError("--tokens-file: --local-clients have no tokens; start clients with "
                             "fedmeta-client --token-file instead")
    if v["tls_cert"] is not None and v["local_clients"] and v["tls_ca"] is None:
        raise ValueError("--local-clients with TLS: give --tls-ca too, so the local clients can verify the server")
    if v["tls_cert"] is None and not v["insecure"] and not is_loopback(v["host"]):
        raise ValueError(f"--host {v['host']}: serving beyond loopback without TLS exposes every update; "
                         "pass --tls-cert and --tls-key (see fedmeta-certs), or --insecure to accept plaintext")


def _check_admin(v: dict[str, Any]) -> None:
    """The admin credential must be usable and distinct; a dashboard beyond loopback must be protected."""
    if v["admin_token_file"] is not None:
        from fedmeta.server.admin_auth import check_distinct, read_admin_token

        token = read_admin_token(Path(v["admin_token_file"]))
        check_distinct(token, Path(v["tokens_file"]) if v["tokens_file"] else None)
    if v["admin_cert_name"] is not None:
        if not v["require_client_cert"]:
            raise ValueError("--admin-cert-name: needs --require-client-cert (the certificate is checked by mutual TLS)")
        check_client_id(v["admin_cert_name"])
    if v["dashboard_port"] is not None and not is_loopback(v["dashboard_host"]):
        if v["admin_token_file"] is None:
            raise ValueError(f"--dashboard-host {v['dashboard_host']}: a dashboard beyond loopback needs "
                             "--admin-token-file (browsers send it as a bearer token)")
        if v["tls_cert"] is None and not v["insecure"]:
            raise ValueError(f"--dashboard-host {v['dashboard_host']}: beyond loopback the dashboard serves HTTPS "
                             "with --tls-cert/--tls-key; pass --insecure to accept plain HTTP")


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


def resume_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings declared resume=True whose describe() values differ ("key: checkpoint X, now Y");
    keys a checkpoint from before a setting lacks compare with that setting's default."""
    return resume_mismatches(OPTIONS, stored, current)
