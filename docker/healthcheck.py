#!/usr/bin/env python3
"""fedmeta-healthcheck: exit 0 when the coordinator in this container answers grpc.health.v1 Check with SERVING.

A client container (its main process runs `fedmeta-entrypoint client`) is healthy while it runs.
The coordinator is asked on 127.0.0.1 at FEDMETA_SERVER_PORT (default 50051), over TLS when
FEDMETA_SERVER_TLS_CERT is set: verified with FEDMETA_HEALTH_TLS_CA (default FEDMETA_SERVER_TLS_CA)
for the name FEDMETA_HEALTH_SERVER_NAME (default localhost, which fedmeta-certs puts in the
server certificate by default). Under --require-client-cert set FEDMETA_HEALTH_TLS_CERT and
FEDMETA_HEALTH_TLS_KEY to a client certificate and key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def role() -> str:
    try:
        cmdline = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "server"
    return "client" if b"client" in cmdline else "server"


def check(env: os._Environ[str] | dict[str, str]) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = env.get("FEDMETA_SERVER_PORT", "").strip() or "50051"
    target = f"127.0.0.1:{port}"
    if env.get("FEDMETA_SERVER_TLS_CERT", "").strip():
        ca = env.get("FEDMETA_HEALTH_TLS_CA", "").strip() or env.get("FEDMETA_SERVER_TLS_CA", "").strip()
        cert, key = env.get("FEDMETA_HEALTH_TLS_CERT", "").strip(), env.get("FEDMETA_HEALTH_TLS_KEY", "").strip()
        creds = grpc.ssl_channel_credentials(
            Path(ca).read_bytes() if ca else None,
            Path(key).read_bytes() if key else None,
            Path(cert).read_bytes() if cert else None,
        )
        name = env.get("FEDMETA_HEALTH_SERVER_NAME", "").strip() or "localhost"
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=4.0)
        except grpc.RpcError as exc:
            return False, f"{target}: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main() -> int:
    if role() == "client":
        print("client: running")
        return 0
    ok, text = check(os.environ)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
