#!/usr/bin/env python3
"""fedmeta-entrypoint: start the coordinator or a client from environment variables.

    fedmeta-entrypoint server [FLAG ...]   fedmeta-server, with every FEDMETA_SERVER_* variable as a flag
    fedmeta-entrypoint client [FLAG ...]   fedmeta-client, with every FEDMETA_CLIENT_* variable as a flag
    fedmeta-entrypoint COMMAND [ARG ...]   any other command (fedmeta-certs, fedmeta-tokens, sh, ...)

FEDMETA_SERVER_ROUNDS=20 becomes `--rounds 20` and FEDMETA_SERVER_INSECURE=1 becomes `--insecure`;
an empty value, or 0/false/no for a switch, leaves the flag out. Flags written after the mode
come last and win. In a client's values `{client_id}` stands for the client's id, so one
setting serves every replica: FEDMETA_CLIENT_TOKEN_FILE=/credentials/token-{client_id}.txt.

A client's id is FEDMETA_CLIENT_ID (or --client-id) when given. Otherwise a replica of a
scaled compose service takes the number of its container (`fedmeta-client-3` under compose
v2, `fedmeta_client_3` under v1, found by a reverse lookup of its own address in Docker's
DNS): PREFIX-3, with PREFIX from FEDMETA_CLIENT_ID_PREFIX (default `client`). The number
stays the same across restarts and `down`/`up`, so the id does too, and so does its data
share (--shard defaults to the number an id ends with). Outside such a network the id is
the container's hostname.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Collection, Mapping

FALSE = {"0", "false", "no", "off"}
TRUE = {"1", "true", "yes", "on"}
DOCKER_DNS = "127.0.0.11"


def env_flags(env: Mapping[str, str], prefix: str, switches: set[str], *, skip: Collection[str] = (),
              substitute: Callable[[str], str] = lambda v: v) -> list[str]:
    """[--flag, value, ...] from env vars PREFIX<FLAG>, sorted by name; switches take no value."""
    argv: list[str] = []
    for key in sorted(env):
        if not key.startswith(prefix) or key in skip:
            continue
        value = env[key].strip()
        flag = "--" + key[len(prefix):].lower().replace("_", "-")
        if not value:
            continue
        if flag in switches:
            if value.lower() in TRUE:
                argv.append(flag)
            elif value.lower() not in FALSE:
                raise SystemExit(f"fedmeta-entrypoint: error: {key}: {flag} is a switch: expected 1/true/yes "
                                 f"or 0/false/no, got {value!r}")
        else:
            argv += [flag, substitute(value)]
    return argv


def switches_of(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of the flags that take no value (store_true and friends)."""
    return {s for a in parser._actions if a.nargs == 0 for s in a.option_strings if s.startswith("--")}


def _ptr_query(ip: str, server: str = DOCKER_DNS, timeout_s: float = 2.0) -> str | None:
    """The first PTR name for an IPv4 address, asked straight from Docker's embedded DNS server.

    /etc/hosts maps the container's own address to its hostname (the container id), so the
    resolver library never asks DNS; Docker's DNS answers with `<container name>.<network>`.
    """
    qname = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
    tid = int.from_bytes(os.urandom(2), "big")
    query = struct.pack(">HHHHHH", tid, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0" + struct.pack(">HH", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        s.sendto(query, (server, 53))
        data, _ = s.recvfrom(4096)
    if len(data) < 12 or int.from_bytes(data[:2], "big") != tid:
        return None
    qd, an = struct.unpack(">HH", data[4:8])

    def name_at(pos: int) -> tuple[str, int]:
        labels: list[str] = []
        end: int | None = None
        for _ in range(128):
            n = data[pos]
            if n == 0:
                return ".".join(labels), end if end is not None else pos + 1
            if n & 0xC0 == 0xC0:
                end = pos + 2 if end is None else end
                pos = int.from_bytes(data[pos:pos + 2], "big") & 0x3FFF
                continue
            labels.append(data[pos + 1:pos + 1 + n].decode("ascii", "replace"))
            pos += 1 + n
        raise ValueError("DNS name loop")

    pos = 12
    for _ in range(qd):
        pos = name_at(pos)[1] + 4
    for _ in range(an):
        pos = name_at(pos)[1]
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 12:
            return name_at(pos)[0]
        pos += rdlen
    return None


def replica_number() -> int | None:
    """The number of this compose replica (`project-service-N` / `project_service_N`), if any."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
        name = _ptr_query(ip)
    except (OSError, ValueError, IndexError, struct.error):
        return None
    if not name:
        return None
    match = re.search(r"[-_](\d+)$", name.split(".")[0])
    return int(match.group(1)) if match else None


def client_id(env: Mapping[str, str], number: Callable[[], int | None] = replica_number) -> str:
    if env.get("FEDMETA_CLIENT_ID", "").strip():
        return env["FEDMETA_CLIENT_ID"].strip()
    n = number()
    if n is not None:
        return f"{env.get('FEDMETA_CLIENT_ID_PREFIX', '').strip() or 'client'}-{n}"
    return socket.gethostname()


def server_argv(env: Mapping[str, str], extra: list[str]) -> list[str]:
    from fedmeta.server.cli import build_parser

    return env_flags(env, "FEDMETA_SERVER_", switches_of(build_parser())) + extra


def client_argv(env: Mapping[str, str], extra: list[str],
                number: Callable[[], int | None] = replica_number) -> list[str]:
    from fedmeta.client.cli import build_parser

    given = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--client-id"), None)
    given = given or next((a.split("=", 1)[1] for a in extra if a.startswith("--client-id=")), None)
    cid = given or client_id(env, number)
    flags = env_flags(env, "FEDMETA_CLIENT_", switches_of(build_parser()),
                      skip={"FEDMETA_CLIENT_ID", "FEDMETA_CLIENT_ID_PREFIX"},
                      substitute=lambda v: v.replace("{client_id}", cid))
    return ["--client-id", cid, *flags, *extra]


def main(argv: list[str]) -> int:
    mode, rest = (argv[0], argv[1:]) if argv else ("server", [])
    if mode == "server":
        from fedmeta.server.cli import main as server_main

        args = server_argv(os.environ, rest)
        print("fedmeta-entrypoint: fedmeta-server " + " ".join(args), flush=True)
        return server_main(args)
    if mode == "client":
        from fedmeta.client.cli import main as client_main

        args = client_argv(os.environ, rest)
        shown = " ".join(args)
        print("fedmeta-entrypoint: fedmeta-client " + shown, flush=True)
        return client_main(args)
    try:
        os.execvp(mode, [mode, *rest])
    except OSError as exc:
        print(f"fedmeta-entrypoint: error: cannot run {mode!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
