"""The operator's credential for the Admin service and the dashboard, separate from every client's.

--admin-token-file holds one line, the admin token (at least MIN_TOKEN_CHARS printable
characters without spaces; `python -c "import secrets; print(secrets.token_hex(32))"`).
Only its SHA-256 is kept in memory; a call's bearer token is hashed and compared with
hmac.compare_digest, so the comparison takes the same time wherever the tokens differ.
At start-up the token is checked against every line of --tokens-file: an admin token
that is also a client's token is refused (a client could otherwise steer the run).

Under mutual TLS, --admin-cert-name names the operator's certificate (its CN or a DNS
SAN); a call whose verified certificate names it is the operator. No client may join
under that id (server/service.py), so a client certificate is never an admin one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedmeta.server.auth import hash_token, parse_tokens_file

log = logging.getLogger("fedmeta.auth")
MIN_TOKEN_CHARS = 32
MAX_TOKEN_CHARS = 512


def read_admin_token(path: Path) -> str:
    """The token in an --admin-token-file; ValueError naming the flag if it is missing or weak."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--admin-token-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"--admin-token-file: {path} must hold exactly one line, the token; it has {len(lines)}")
    token = lines[0]
    if not (MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS) or not token.isprintable() or " " in token:
        raise ValueError(f"--admin-token-file: {path}: the token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                         "printable characters without spaces (e.g. 64 hex digits from secrets.token_hex(32))")
    return token


def check_distinct(admin_token: str, tokens_file: Path | None) -> None:
    """ValueError if the admin token is also a client's token in --tokens-file."""
    if tokens_file is None:
        return
    for client_id, (salt, digest) in parse_tokens_file(tokens_file).items():
        if hmac.compare_digest(digest, hash_token(admin_token, salt)):
            raise ValueError(f"--admin-token-file: the admin token is also client {client_id!r}'s token in "
                             "--tokens-file; issue a distinct admin token")


def warn_if_readable(path: Path) -> None:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--admin-token-file %s is readable by other users (mode %o): chmod 600 it", path,
                    stat.S_IMODE(mode))


@dataclass(frozen=True)
class AdminCredential:
    """Who may call Admin: the holder of the token, or of the certificate named cert_name (mutual TLS)."""

    token_sha256: bytes | None
    cert_name: str | None

    @classmethod
    def load(cls, token_file: str | None, cert_name: str | None, tokens_file: str | None) -> AdminCredential | None:
        """None when no admin credential is configured: the Admin service is then not served."""
        if token_file is None and cert_name is None:
            return None
        digest = None
        if token_file is not None:
            token = read_admin_token(Path(token_file))
            check_distinct(token, Path(tokens_file) if tokens_file else None)
            warn_if_readable(Path(token_file))
            digest = hashlib.sha256(token.encode()).digest()
        return cls(digest, cert_name)

    def token_ok(self, authorization: str) -> bool:
        """Constant-time check of an `authorization: Bearer TOKEN` value."""
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        if self.token_sha256 is None or not token:
            return False
        return hmac.compare_digest(self.token_sha256, hashlib.sha256(token.encode()[:MAX_TOKEN_CHARS + 1]).digest())

    def check(self, context: grpc.ServicerContext) -> None:
        """Abort the call unless it carries the admin credential.

        UNAUTHENTICATED: no token or a wrong one (a client's token is a wrong one);
        PERMISSION_DENIED: a verified client certificate that is not the operator's.
        """
        metadata = dict(context.invocation_metadata() or ())
        auth = metadata.get("authorization", "")
        if isinstance(auth, bytes):
            auth = ""
        if self.token_ok(auth):
            return
        if self.cert_name is not None:
            names = context.auth_context().get("x509_common_name", []) + \
                context.auth_context().get("x509_subject_alternative_name", [])
            decoded = [n.decode(errors="replace") for n in names]
            if self.cert_name in decoded:
                return
            if decoded:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "this client certificate is not the operator's (--admin-cert-name); the Admin service "
                              "is not open to federation clients")
        what = "no admin token" if not auth else "a wrong admin token"
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"{what}: the Admin service needs the coordinator's admin credential (fedmeta-status "
                      "--admin-token-file); federation clients' tokens are not admin tokens")
