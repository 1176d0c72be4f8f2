"""Command-line conveniences shared by the server and the client (no network, no processes)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `prog: error: message`, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def setup_logging(level: str, log_format: str = "text", *, client: str | None = None) -> None:
    """Log to stderr (common/logformat.py: text for people, json for log shippers)."""
    from fedmeta.common import logformat

    logformat.setup_logging(level, log_format, client=client)


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    from fedmeta.common.logformat import FORMATS

    parser.add_argument("--log-format", default="text", choices=FORMATS,
                        help="text (for people, the default) or json: one JSON object per line with time, level, "
                             "logger, event, round, client and message, for log shippers")


def add_model_import_argument(parser: argparse.ArgumentParser) -> None:
    """--allow-model-import: the only way a model named by an import path is ever built in this process."""
    parser.add_argument("--allow-model-import", action="append", default=[], metavar="MODULE:CLASS",
                        help="allow this import path as a model (exactly; repeat it or separate several with "
                             "commas). A model named by a run configuration or a model.json is otherwise one of "
                             "the zoo's: an import path runs code on this machine")


def model_imports(args: argparse.Namespace) -> frozenset[str]:
    """The --allow-model-import values, split on commas and checked (ValueError naming the flag)."""
    from fedmeta.common.models import check_import_paths

    return check_import_paths([p.strip() for v in args.allow_model_import for p in v.split(",") if p.strip()])
