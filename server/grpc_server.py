"""Building the coordinator's gRPC server: the Coordinator service, health, reflection, limits, TLS.

`create_server(config, coordinator) -> (server, port)` binds but does not start; tests bind
127.0.0.1:0. The RPC handlers are in server/service.py.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from fedmeta.common.proto import admin_pb_grpc, pb, pb_grpc
from fedmeta.server.admin_auth import AdminCredential
from fedmeta.server.admin_service import AdminService
from fedmeta.server.auth import TokenInterceptor, TokenStore
from fedmeta.server.config import ServerConfig, is_loopback
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.service import _MESSAGE_OVERHEAD, SERVICE_NAME, CoordinatorService

log = logging.getLogger("fedmeta.service")


# Keepalive: the coordinator accepts a client ping every KEEPALIVE_MIN_PING_S without data and
# none without calls; client/worker.py pings every KEEPALIVE_CLIENT_PING_S (>= that), so honest
# clients are never sent GOAWAY for "too many pings" (tests/unit/test_limits.py checks the pair).
KEEPALIVE_MIN_PING_S = 30.0
KEEPALIVE_SERVER_PING_S = 60.0  # the coordinator's own pings find dead peers of idle connections
HANDSHAKE_TIMEOUT_S = 10.0


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments that bound a connection's idle time, age, handshake and pings."""
    grace_s = 2 * config.run.poll_timeout_s + 30.0  # the longest honest call: a long-poll, an upload
    return [
        ("grpc.max_connection_idle_ms", int(config.max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_MIN_PING_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_SERVER_PING_S * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


class _Reflection(reflection.ReflectionServicer):
    """Server reflection whose streams take a stream slot and are cancelled when idle, like updates."""

    def __init__(self, names: tuple[str, ...], service: CoordinatorService) -> None:
        super().__init__(names)
        self.service = service

    def ServerReflectionInfo(self, request_iterator, context):  # type: ignore[no-untyped-def]
        service = self.service
        if not service.streams.try_enter():
            context.abort(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly")
        try:
            with service.watchdog.watch(context) as w:
                yield from super().ServerReflectionInfo(service.watchdog.requests(w, request_iterator), context)
        finally:
            service.streams.leave()


class _Health(health.HealthServicer):
    """Health checking with Check only: a Watch stream would hold a worker thread for as long as
    the peer likes (orchestrator probes and grpc_health_probe use Check)."""

    def Watch(self, request, context, send_response_callback=None):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Health.Watch is not served; use Health.Check")


def _as_is(message: bytes | pb.FetchParametersResponse) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Handlers:
    """Collects the generated add_CoordinatorServicer_to_server's method handlers."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods = dict(methods)


def add_coordinator_service(service: CoordinatorService, server: grpc.Server) -> None:
    """The generated Coordinator handlers, with FetchParameters sending the serialised messages
    the coordinator makes once per θ version as they are (server/broadcast.py WireCache)."""
    collected = _Handlers()
    pb_grpc.add_CoordinatorServicer_to_server(service, collected)  # type: ignore[arg-type]
    fetch = collected.methods.get("FetchParameters")
    if fetch is None or not fetch.response_streaming:
        raise RuntimeError("the generated Coordinator service has no server-streaming FetchParameters")
    collected.methods["FetchParameters"] = grpc.unary_stream_rpc_method_handler(
        service.FetchParameters, request_deserializer=fetch.request_deserializer, response_serializer=_as_is)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, collected.methods),))
    server.add_registered_method_handlers(SERVICE_NAME, collected.methods)


def create_server(config: ServerConfig, coordinator: Coordinator) -> tuple[grpc.Server, int]:
    """A started-but-not-serving gRPC server bound to config.host:config.port; returns (server, port)."""
    max_message = config.run.chunk_bytes + _MESSAGE_OVERHEAD
    interceptors = [TokenInterceptor(TokenStore(Path(config.tokens_file)))] if config.tokens_file else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="fedmeta-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
            # No automatic growth of HTTP/2 flow-control windows: clients waiting for an upload
            # slot would otherwise buffer ever larger parts of their updates in the server
            # (+490 MB vs +172 MB for 64 clients x 4 MB, benchmarks/load_clients.py).
            ("grpc.http2.bdp_probe", 0),
            *connection_options(config),
        ],
    )
    service = CoordinatorService(coordinator)
    add_coordinator_service(service, server)
    # The Admin service exists only with an admin credential: without one there is nobody it
    # could be for, and a service that is not registered answers UNIMPLEMENTED to every caller.
    admin = AdminCredential.load(config.admin_token_file, config.admin_cert_name, config.tokens_file)
    if admin is not None:
        admin_pb_grpc.add_AdminServicer_to_server(AdminService(coordinator, admin), server)
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not config.no_reflection:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(_Reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            service), server)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            require_client_auth=config.require_client_cert,
        )
        port = server.add_secure_port(address, credentials)
    else:
        if not is_loopback(config.host):
            log.warning("SERVING PLAINTEXT ON %s (--insecure): anyone on the network can read and forge "
                        "updates and parameters; use --tls-cert/--tls-key", address)
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}: is the port in use? pass --port 0 to pick a free one")
    if config.tls_cert is not None and not config.require_client_cert and config.tokens_file is None:
        log.warning("TLS WITHOUT CLIENT AUTHENTICATION: anyone who can reach %s can join under any client id and "
                    "submit updates; pass --require-client-cert (with --tls-ca) or --tokens-file", address)
    return server, port
