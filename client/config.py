"""A client's settings, declared once as ClientConfig field metadata (the fedmeta-client flags
come from them: client/cli.py), and the channel they open to the coordinator."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedmeta.client.retry import RetryPolicy
from fedmeta.common.config import check_client_id
from fedmeta.common.models import check_import_paths
from fedmeta.common.net import host_of, is_loopback
from fedmeta.common.settings import check_fields, setting

KEEPALIVE_PING_S = 60.0


def default_data_seed(client_id: str) -> int:
    """A stable data seed from the client id, so restarts see the same data."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class ClientConfig:
    """One client's settings: where the coordinator is, who it is, what it computes on.

    Each field's `setting(...)` is its fedmeta-client flag (client/cli.py derives the parser).
    """

    server: str = field(metadata=setting("coordinator address, e.g. 10.0.0.5:50051", metavar="HOST:PORT",
                                         required=True))
    client_id: str = field(metadata=setting("this client's id: 1-64 characters from [A-Za-z0-9._-]",
                                            required=True))
    data_seed: int = field(metadata=setting(
        "seed of this client's local task stream (default: derived from --client-id)",
        derive=lambda v: default_data_seed(v["client_id"])))
    device: str = field(default="cpu", metadata=setting("cpu or cuda[:N]"))
    threads: int = field(default=0, metadata=setting("torch CPU threads; 0 keeps torch's default", minimum=0))
    # None: the model's preference (vmap_default), else vmap on or off
    vectorize: bool | None = field(default=None, metadata=setting(
        "batch a meta-batch's tasks with torch.func.vmap (default: when the model benefits: MLPs yes, conv4 no)",
        name="vmap", no_help="loop over tasks one at a time"))
    retry: RetryPolicy = RetryPolicy()  # its give_up_s: --give-up-s (client/cli.py)
    tls_ca: str | None = field(default=None, metadata=setting(
        "CA certificate to verify the coordinator with; enables TLS", metavar="PEM"))
    tls_cert: str | None = field(default=None, metadata=setting(
        "this client's certificate, for mutual TLS (CN/SAN = --client-id)", metavar="PEM"))
    tls_key: str | None = field(default=None, metadata=setting("this client's private key, for mutual TLS",
                                                               metavar="PEM"))
    tls_server_name: str | None = field(default=None, metadata=setting(
        "name to expect in the coordinator's certificate when it differs from the --server host", metavar="NAME"))
    token_file: str | None = field(default=None, metadata=setting(
        "file holding this client's token (from fedmeta-tokens)", metavar="FILE"))
    data_dir: str | None = field(default=None, metadata=setting(
        "this data holder's local data (needed by --task omniglot on the coordinator)", metavar="DIR"))
    shard: int | None = field(default=None, metadata=setting(
        "this client's share of a partitioned data set, taken mod the run's --shards (default: the number the "
        "client id ends with, else the data seed)", minimum=0))
    task_family: str = field(default="all", metadata=setting(
        "sinusoid: the sub-family this holder's tasks come from: a (phase in [0, pi/2]), b (phase in [pi, "
        "3 pi/2]: minus an a task) or all", choices=("all", "a", "b")))
    # Import paths ("package.module:Class") this client's operator allows as models; none by default,
    # so a coordinator can name only zoo models (common/models.py check_model_spec). Flag: common/cli.py.
    allow_model_imports: frozenset[str] = frozenset()
    slow_task_s: float = field(default=0.0, metadata=setting(
        "benchmarking and testing aid: sleep this many seconds before each training step (one TRAIN assignment), "
        "to play a slow client (benchmarks/buffered.py); never set it in a real run", minimum=0.0, maximum=3600.0))
    # allow sending --token-file over plaintext beyond loopback
    insecure: bool = field(default=False, metadata=setting(
        "send --token-file without TLS to a coordinator beyond loopback (anyone on the path can read the token; "
        "default: refused)"))

    def __post_init__(self) -> None:
        check_fields(self)
        check_client_id(self.client_id)
        check_import_paths(self.allow_model_imports)
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir: no such directory: {self.data_dir}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device: expected cpu or cuda[:N], got {self.device!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("--tls-cert: needs --tls-ca, the CA that signed the coordinator's certificate")
        for name in ("tls_ca", "tls_cert", "tls_key", "token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")
        host = host_of(self.server)
        if self.token_file is not None and self.tls_ca is None and not self.insecure and not is_loopback(host):
            raise ValueError(f"--token-file: {host} is not a loopback address, and without --tls-ca the token "
                             "would cross the network in plaintext, readable by anyone on the path; pass "
                             "--tls-ca (TLS), or --insecure to send it anyway")

    def channel(self) -> grpc.Channel:
        """A channel to the coordinator: TLS when --tls-ca is given, mutual TLS with --tls-cert/--tls-key."""
        options = channel_options()
        if self.tls_ca is None:
            return grpc.insecure_channel(self.server, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.tls_ca).read_bytes(),
            private_key=Path(self.tls_key).read_bytes() if self.tls_key else None,
            certificate_chain=Path(self.tls_cert).read_bytes() if self.tls_cert else None,
        )
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.secure_channel(self.server, credentials, options=options)


def channel_options() -> list[tuple[str, int | str]]:
    """The client channel's arguments: message size caps and keepalive."""
    return [
        ("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20),
        # Keepalive within the coordinator's policy (server/service.py connection_options): a ping
        # every KEEPALIVE_PING_S >= its minimum, only while calls are open, so it never GOAWAYs us.
        ("grpc.keepalive_time_ms", int(KEEPALIVE_PING_S * 1000)), ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # gRPC's own reconnect backoff grows to 120 s by default: a coordinator restarted after a
        # minute would wait up to two more for its clients. Cap it like RetryPolicy.max_delay_s.
        ("grpc.max_reconnect_backoff_ms", 5000)]
