"""Address checks shared by the coordinator and the client: is traffic to this host confined to the machine?"""

from __future__ import annotations

import ipaddress
import socket

# RFC 6761: "localhost" and names under ".localhost" are never delegated, so no outside DNS
# server answers for them; any other name is whatever its zone's owner makes it.
_LOCAL_NAMES = ("localhost",)


def host_of(address: str) -> str:
    """The host part of HOST:PORT ("[::1]:50051" -> "::1"); a bare host is returned as it is."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        host = address  # no port, or a bare IPv6 literal
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback address, so its traffic never leaves the machine.

    An IP literal is judged by itself (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104). A name counts
    only when it is `localhost` or ends in `.localhost` and every address socket.getaddrinfo
    gives for it is loopback; a name that does not resolve is not loopback. Every other name is
    not loopback, whatever it resolves to now: `127.attacker.example` is just a name, and
    `127.0.0.1.nip.io` resolves to 127.0.0.1 today but its owner's DNS answer can change between
    this check and the connection (DNS rebinding).
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return False
    literal = _ip(host)
    if literal is not None:
        return _loopback(literal)
    name = host.rstrip(".").lower()
    if not any(name == n or name.endswith("." + n) for n in _LOCAL_NAMES):
        return False
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = [_ip(str(info[4][0])) for info in infos]
    return bool(addresses) and all(a is not None and _loopback(a) for a in addresses)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
