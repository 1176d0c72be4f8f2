"""fedmeta-client: join a coordinator and run the inner loops on local tasks."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from client.retry import CoordinatorUnreachable, RetryPolicy
from client.worker import ClientConfig, ClientError, Shutdown, Worker, default_data_seed
from common.cli import OneLineErrorParser, add_model_import_argument, model_imports, setup_logging
from common.config import check_client_id


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fedmeta-client",
        description="Join a fedmeta coordinator, train on local tasks when sampled, and exit when the run finishes.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="coordinator address, e.g. 10.0.0.5:50051")
    parser.add_argument("--client-id", required=True, help="this client's id: 1-64 characters from [A-Za-z0-9._-]")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="seed of this client's local task stream (default: derived from --client-id)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="this data holder's local data (needed by --task omniglot on the coordinator)")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official Omniglot archives into --data-dir when they are missing "
                             "(nothing is downloaded without this flag)")
    parser.add_argument("--shard", type=int, default=None,
                        help="this client's share of a partitioned data set, taken mod the run's --shards "
                             "(default: the number the client id ends with, else the data seed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default (default: 0)")
    vmap = parser.add_mutually_exclusive_group()
    vmap.add_argument("--vmap", dest="vmap", action="store_true", default=None,
                      help="batch a meta-batch's tasks with torch.func.vmap (default: when the model benefits: "
                           "MLPs yes, conv4 no)")
    vmap.add_argument("--no-vmap", dest="vmap", action="store_false", help="loop over tasks one at a time")
    parser.add_argument("--give-up-s", type=float, default=300.0,
                        help="seconds to keep retrying an unreachable coordinator before exiting 1 (default: 300)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the coordinator with; enables TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="this client's certificate, for mutual TLS (CN/SAN = --client-id)")
    parser.add_argument("--tls-key", metavar="PEM", help="this client's private key, for mutual TLS")
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="name to expect in the coordinator's certificate when it differs from the --server host")
    parser.add_argument("--token-file", metavar="FILE", help="file holding this client's token (from fedmeta-tokens)")
    parser.add_argument("--insecure", action="store_true",
                        help="send --token-file without TLS to a coordinator beyond loopback (anyone on the path "
                             "can read the token; default: refused)")
    add_model_import_argument(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (default: info)")
    return parser


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, sep, port = args.server.rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        parser.error(f"--server: expected HOST:PORT with a port from 1 to 65535, got {args.server!r}")
    if args.threads < 0:
        parser.error(f"--threads: expected an integer >= 0, got {args.threads}")
    if not args.give_up_s > 0:
        parser.error(f"--give-up-s: expected a positive number, got {args.give_up_s}")
    try:
        check_client_id(args.client_id)
    except ValueError as exc:
        parser.error(f"--client-id: {exc}")
    if args.download:
        if args.data_dir is None:
            parser.error("--download: needs --data-dir, the folder to put the Omniglot archives in")
        from pathlib import Path

        from common.tasks.omniglot_download import download

        try:
            download(Path(args.data_dir))
        except ValueError as exc:
            print(f"fedmeta-client: error: {exc}", file=sys.stderr)
            return 1
    try:
        config = ClientConfig(
            server=args.server,
            client_id=args.client_id,
            data_seed=default_data_seed(args.client_id) if args.data_seed is None else args.data_seed,
            device=args.device,
            threads=args.threads,
            vectorize=args.vmap,
            retry=RetryPolicy(give_up_s=args.give_up_s),
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token_file=args.token_file,
            data_dir=args.data_dir,
            shard=args.shard,
            allow_model_imports=model_imports(args),
            insecure=args.insecure,
        )
        worker = Worker(config)
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        return worker.run_forever()
    except Shutdown as exc:
        logging.getLogger("fedmeta.client").info("%s received; leaving the run", exc)
        worker.stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        worker.leave()
        return 0
    except (CoordinatorUnreachable, ClientError) as exc:
        print(f"fedmeta-client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
