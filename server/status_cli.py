"""fedmeta-status and fedmeta-admin: the operator's terminal onto the coordinator's Admin service.

    fedmeta-status --server HOST:PORT --admin-token-file F [--watch [S]]
    fedmeta-admin  --server HOST:PORT --admin-token-file F pause|resume|revoke ID|set-deadline S|set-quorum N|stop

Exit codes: 0 done; 1 the coordinator cannot be reached, refused the credential, or
refused the action (one line on stderr says which); 2 bad flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc

from fedmeta.common.cli import OneLineErrorParser
from fedmeta.common.net import host_of, is_loopback
from fedmeta.common.proto import admin_pb, admin_pb_grpc
from fedmeta.common.textsafe import clip
from fedmeta.server.admin_auth import read_admin_token
from fedmeta.server.status_view import render

RPC_TIMEOUT_S = 10.0


class Failed(Exception):
    """One line for stderr, then exit 1."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="coordinator address HOST:PORT (default: %(default)s)")
    parser.add_argument("--admin-token-file", metavar="FILE", help="file holding the coordinator's admin token")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signed the coordinator's (TLS)")
    parser.add_argument("--tls-cert", metavar="FILE", help="the operator's certificate, for mutual TLS (--admin-cert-name)")
    parser.add_argument("--tls-key", metavar="FILE", help="the operator's private key, for mutual TLS")
    parser.add_argument("--tls-server-name", metavar="NAME", help="expected name in the coordinator's certificate")
    parser.add_argument("--insecure", action="store_true", help="send the admin token without TLS beyond loopback")


def _stub(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[admin_pb_grpc.AdminStub, tuple, grpc.Channel]:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key: give both or neither")
    metadata: tuple = ()
    if args.admin_token_file is not None:
        try:
            token = read_admin_token(Path(args.admin_token_file))
        except ValueError as exc:
            parser.error(str(exc))
        if args.tls_ca is None and not args.insecure and not is_loopback(host_of(args.server)):
            parser.error(f"--admin-token-file: {args.server} is not a loopback address; pass --tls-ca (TLS), or "
                         "--insecure to send the token in plaintext")
        metadata = (("authorization", f"Bearer {token}"),)
    elif args.tls_cert is None:
        parser.error("--admin-token-file: needed (or --tls-cert/--tls-key under --admin-cert-name)")
    if args.tls_ca is None:
        channel = grpc.insecure_channel(args.server)
    else:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(args.tls_ca).read_bytes(),
                private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
                certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None)
        except OSError as exc:
            parser.error(f"cannot read a TLS file: {exc.filename}: {exc.strerror}")
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.server, credentials, options=options)
    return admin_pb_grpc.AdminStub(channel), metadata, channel


def _call(method, request, metadata: tuple, server: str):  # type: ignore[no-untyped-def]
    try:
        return method(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = clip(exc.details() if isinstance(exc, grpc.Call) else str(exc), 300)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Failed(f"cannot reach the coordinator at {server}: {details}") from None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise Failed(f"the coordinator at {server} refused the admin credential ({code.name}): {details}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise Failed(f"the coordinator at {server} serves no Admin service: start it with --admin-token-file") from None
        name = code.name if code is not None else "error"
        raise Failed(f"the coordinator at {server} refused: {name}: {details}") from None


def status_main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="fedmeta-status", description="Show a running coordinator's status: the run, "
                                "its clients, meta-loss and validation sparklines (the Admin service).")
    _common(parser)
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="S",
                        help="refresh every S seconds (default 2) until interrupted")
    parser.add_argument("--offset", type=int, default=0, help="first client of the table (default: 0)")
    parser.add_argument("--limit", type=int, default=20, help="clients in the table, at most 500 (default: 20)")
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch >= 0.2:
        parser.error(f"--watch: expected at least 0.2 seconds, got {args.watch}")
    if not (0 <= args.offset) or not (1 <= args.limit <= 500):
        parser.error("--offset: expected >= 0; --limit: expected 1 to 500")
    stub, metadata, channel = _stub(args, parser)
    request = admin_pb.GetStatusRequest(client_offset=args.offset, client_limit=args.limit)
    width = min(max(os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 80, 60), 160)
    try:
        while True:
            text = render(_call(stub.GetStatus, request, metadata, args.server), width=width)
            if args.watch is None:
                print(text)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except Failed as exc:
        print(f"fedmeta-status: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()


def admin_main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="fedmeta-admin", description="Steer a running coordinator (its Admin service); "
                                "every action is logged in the run directory's admin.jsonl.")
    _common(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("pause", help="stop sampling: the open round finishes, no new round opens")
    sub.add_parser("resume", help="sample again after pause")
    revoke = sub.add_parser("revoke", help="revoke a client now: its update is refused, it cannot rejoin")
    revoke.add_argument("client_id")
    deadline = sub.add_parser("set-deadline", help="--round-deadline-s for the rounds that open from now on")
    deadline.add_argument("seconds", type=float)
    quorum = sub.add_parser("set-quorum", help="--min-clients (the quorum at a round's deadline) from now on")
    quorum.add_argument("clients", type=int)
    sub.add_parser("stop", help="stop after the open round: checkpoint, model/ exported, the coordinator exits")
    args = parser.parse_args(argv)
    stub, metadata, channel = _stub(args, parser)
    calls = {
        "pause": (stub.Pause, lambda: admin_pb.PauseRequest()),
        "resume": (stub.Resume, lambda: admin_pb.ResumeRequest()),
        "revoke": (stub.RevokeClient, lambda: admin_pb.RevokeClientRequest(client_id=args.client_id)),
        "set-deadline": (stub.SetRoundDeadline, lambda: admin_pb.SetRoundDeadlineRequest(round_deadline_s=args.seconds)),
        "set-quorum": (stub.SetQuorum, lambda: admin_pb.SetQuorumRequest(min_clients=min(max(0, args.clients), 2**32 - 1))),
        "stop": (stub.StopAfterRound, lambda: admin_pb.StopAfterRoundRequest()),
    }
    method, request = calls[args.action]
    try:
        print(clip(_call(method, request(), metadata, args.server).result, 500))
        return 0
    except Failed as exc:
        print(f"fedmeta-admin: error: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(status_main())
