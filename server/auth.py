"""Per-client tokens: a server interceptor checks every Coordinator call.

The server's --tokens-file holds one line per client, `CLIENT_ID SALT_HEX SHA256_HEX`, the
SHA-256 of salt || token; tokens are 32 random bytes (hex), so a fast salted hash suffices
and no plaintext token is stored. Clients send `authorization: Bearer TOKEN` and
`fedmeta-client-id: ID` as call metadata. The file is re-read when it changes, so deleting
a line revokes that client at its next call. Tokens never appear in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fedmeta.common import CLIENT_ID_METADATA
from fedmeta.common.cli import OneLineErrorParser
from fedmeta.common.config import check_client_id
from fedmeta.server.private_files import append_private, write_file

log = logging.getLogger("fedmeta.auth")
CLIENT_ID_KEY = CLIENT_ID_METADATA
PROTECTED_PREFIX = "/fedmeta.v1.Coordinator/"


def hash_token(token: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + token.encode()).digest()


def parse_tokens_file(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """{client_id: (salt, digest)}; ValueError naming the line for anything malformed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--tokens-file: cannot read {path}: {exc.strerror}") from None
    entries: dict[str, tuple[bytes, bytes]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError("expected CLIENT_ID SALT_HEX SHA256_HEX")
            client_id = check_client_id(parts[0])
            salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
            if len(digest) != 32 or not salt:
                raise ValueError("the salt must be non-empty and the digest 32 bytes")
        except ValueError as exc:
            raise ValueError(f"--tokens-file: {path} line {number}: {exc}") from None
        entries[client_id] = (salt, digest)
    return entries


class TokenStore:
    """The tokens file, re-read when it changes; it fails closed.

    A file that disappears, becomes unreadable or malformed refuses every call until it is
    fixed (revoking a client by editing the file must never fall back to an older, larger
    set), and the reason is logged once per distinct problem.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int, int] | None = None
        self._entries: dict[str, tuple[bytes, bytes]] = {}
        self.error: str | None = None
        self._entries = parse_tokens_file(path)  # a bad file at start is a one-line startup error
        self._stamp = self._stat()
        log.info("loaded %d client tokens from %s", len(self._entries), self.path)

    def _stat(self) -> tuple[float, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime, st.st_size, st.st_ino)

    def _reload(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp and self.error is None:
                return
            entries = parse_tokens_file(self.path)
        except (OSError, ValueError) as exc:
            message = f"cannot read {self.path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
            if message != self.error:
                log.error("tokens file unusable, refusing every call until it is fixed: %s", message)
            self._entries, self._stamp, self.error = {}, None, message
            return
        if self.error is not None:
            log.warning("tokens file %s is usable again", self.path)
        self._entries, self._stamp, self.error = entries, stamp, None
        log.info("loaded %d client tokens from %s", len(entries), self.path)

    def check(self, client_id: str, token: str) -> bool:
        with self._lock:
            self._reload()
            entry = self._entries.get(client_id)
        if entry is None:
            hmac.compare_digest(b"\0" * 32, hash_token(token, b"\0"))  # same work for unknown ids
            return False
        salt, digest = entry
        return hmac.compare_digest(digest, hash_token(token, salt))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Coordinator calls without a valid token with UNAUTHENTICATED (health and reflection stay open).

    On the server's event loop: the check is one salted SHA-256 and a file stat, no waiting."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        if not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        client_id = metadata.get(CLIENT_ID_KEY, "")
        auth = metadata.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if client_id and token and self.store.check(client_id, token):
            return await continuation(handler_call_details)
        if self.store.error is not None:
            reason = "the coordinator's tokens file is unusable (its operator must fix it)"
        else:
            reason = "no token" if not token else "an unknown client or a wrong or revoked token"
        return _deny(await continuation(handler_call_details), f"UNAUTHENTICATED: {reason} for client "
                     f"{client_id!r}; pass --token-file with the token issued for this --client-id")


def _deny(handler: Any, message: str) -> Any:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def issue_tokens(clients: list[str], tokens_file: Path, out_dir: Path) -> list[Path]:
    """Append a salted hash per client to tokens_file (created 0600 if new) and write out_dir/token-<id>.txt (0600)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, written = [], []
    for client_id in clients:
        check_client_id(client_id)
        token, salt = secrets.token_hex(32), secrets.token_bytes(16)
        lines.append(f"{client_id} {salt.hex()} {hash_token(token, salt).hex()}\n")
        path = out_dir / f"token-{client_id}.txt"
        write_file(path, (token + "\n").encode())  # born 0600: no moment at which others may read it
        written.append(path)
    append_private(tokens_file, "".join(lines))
    return [tokens_file, *written]


def revoke_tokens(clients: list[str], tokens_file: Path) -> int:
    """Turn the clients' lines of tokens_file into comments, in place; return how many.

    The file keeps its inode and size (a single-file bind mount, as in docker-compose.tls.yml,
    sees the change) and each line's client id is overwritten with '#' from its first byte on,
    so a coordinator reading at any instant sees every line either as it was or as a comment:
    never a line that was not there.
    """
    revoked = set(clients)
    count = 0
    with open(tokens_file, "rb+") as f:
        offset = 0
        for line in f.read().splitlines(keepends=True):
            fields = line.split()
            if fields and fields[0].decode(errors="replace") in revoked:
                start = offset + (len(line) - len(line.lstrip()))
                os.pwrite(f.fileno(), b"#" * len(fields[0]), start)
                count += 1
            offset += len(line)
        os.fsync(f.fileno())
    return count


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="fedmeta-tokens",
                                description="Issue per-client tokens: salted hashes for the server, one token file per "
                                            "client; or revoke clients' tokens.")
    parser.add_argument("--clients", help="comma-separated client ids to issue tokens for")
    parser.add_argument("--revoke", metavar="IDS", help="comma-separated client ids whose tokens to delete from "
                                                        "--tokens-file (edited in place; a running coordinator "
                                                        "refuses them at their next call)")
    parser.add_argument("--tokens-file", type=Path, required=True, help="server file of salted hashes (appended to)")
    parser.add_argument("--out", type=Path, help="folder for the clients' token-<id>.txt files (with --clients)")
    args = parser.parse_args(argv)
    if (args.clients is None) == (args.revoke is None):
        parser.error("--clients or --revoke: give exactly one")
    flag = "--clients" if args.clients is not None else "--revoke"
    clients = [c.strip() for c in (args.clients or args.revoke).split(",") if c.strip()]
    if not clients:
        parser.error(f"{flag}: expected at least one client id")
    for c in clients:
        try:
            check_client_id(c)
        except ValueError as exc:
            parser.error(f"{flag}: {c!r}: {exc}")
    if args.revoke is not None:
        try:
            removed = revoke_tokens(clients, args.tokens_file)
        except OSError as exc:
            parser.error(f"--tokens-file: cannot edit {args.tokens_file}: {exc.strerror}")
        print(f"revoked {removed} token(s) in {args.tokens_file}")
        return 0
    if args.out is None:
        parser.error("--out: needed with --clients, the folder for the clients' token files")
    for path in issue_tokens(clients, args.tokens_file, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
