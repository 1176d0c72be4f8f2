"""fedmeta-client: join a coordinator and run the inner loops on local tasks."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from fedmeta.client.retry import CoordinatorUnreachable, RetryPolicy
from fedmeta.client.config import ClientConfig
from fedmeta.client.worker import ClientError, Shutdown, Worker
from fedmeta.common.cli import OneLineErrorParser, add_model_import_argument, model_imports, setup_logging
from fedmeta.common.config import check_client_id
from fedmeta.common.logformat import FORMATS
from fedmeta.common.settings import Setting, add_arguments, check_value, field_values, fill_defaults, settings_of


# The flags that are not ClientConfig fields (those are declared on its fields, client/worker.py).
DOWNLOAD = Setting("download", bool, "fetch the official Omniglot archives into --data-dir when they are missing "
                   "(nothing is downloaded without this flag)", False)
GIVE_UP_S = Setting("give_up_s", float, "seconds to keep retrying an unreachable coordinator before exiting 1",
                    300.0, positive=True)
LOG_LEVEL = Setting("log_level", str, "log verbosity", "info", choices=("debug", "info", "warning", "error"))
LOG_FORMAT = Setting("log_format", str, "text (for people) or json: one JSON object per line with time, level, "
                     "logger, event, round, client and message, for log shippers", "text", choices=FORMATS)
SETTINGS: tuple[Setting, ...] = (*settings_of(ClientConfig), DOWNLOAD, GIVE_UP_S)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fedmeta-client",
        description="Join a fedmeta coordinator, train on local tasks when sampled, and exit when the run finishes.",
    )
    add_arguments(parser, SETTINGS, typed=True)
    add_model_import_argument(parser)
    add_arguments(parser, (LOG_LEVEL, LOG_FORMAT), typed=True)
    return parser


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    host, sep, port = args.server.rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        parser.error(f"--server: expected HOST:PORT with a port from 1 to 65535, got {args.server!r}")
    try:
        for s in SETTINGS:  # their declared ranges (--threads, --shard, --give-up-s)
            check_value(s, getattr(args, s.name))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        check_client_id(args.client_id)
    except ValueError as exc:
        parser.error(f"--client-id: {exc}")
    setup_logging(args.log_level, args.log_format, client=args.client_id)
    if args.download:
        if args.data_dir is None:
            parser.error("--download: needs --data-dir, the folder to put the Omniglot archives in")
        from pathlib import Path

        from fedmeta.common.tasks.omniglot_download import download

        try:
            download(Path(args.data_dir))
        except ValueError as exc:
            print(f"fedmeta-client: error: {exc}", file=sys.stderr)
            return 1
    values = fill_defaults(SETTINGS, {s.name: getattr(args, s.name) for s in SETTINGS})
    try:
        config = ClientConfig(**field_values(ClientConfig, values), retry=RetryPolicy(give_up_s=args.give_up_s),
                              allow_model_imports=model_imports(args))
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
