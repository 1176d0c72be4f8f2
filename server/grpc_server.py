"""Building the coordinator's gRPC server: the Coordinator service, health, reflection, limits, TLS.

`create_server(config, coordinator) -> (server, port)` binds but does not start; tests bind
127.0.0.1:0. The RPC handlers are in server/service.py.

The server is grpc.aio on an event loop of its own thread (Server below, with the start /
stop / wait_for_termination of a grpc.Server, so the CLI and tests drive it the same way).
The Coordinator, Health and Reflection services are coroutines; the Admin service (a few
operator calls) runs on --max-workers threads, which also take the coordinator's O(model)
work (decoding, aggregating, serialising θ) off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from fedmeta.common.proto import admin_pb_grpc, pb, pb_grpc
from fedmeta.server.admin_auth import AdminCredential
from fedmeta.server.admin_service import AdminService
from fedmeta.server.auth import TokenInterceptor, TokenStore
from fedmeta.server.config import ServerConfig, is_loopback
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.limits import StreamIdle
from fedmeta.server.service import _MESSAGE_OVERHEAD, SERVICE_NAME, CoordinatorService, PollRequest

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


class _Reflection(reflection.aio.ReflectionServicer):
    """Server reflection whose streams take a stream slot and end when idle, like updates."""

    def __init__(self, names: tuple[str, ...], service: CoordinatorService) -> None:
        super().__init__(names)
        self.service = service

    async def ServerReflectionInfo(self, request_iterator, context):  # type: ignore[no-untyped-def,override]
        service = self.service
        if not service.streams.try_enter():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly")
        try:
            timer = service.timer()

            async def requests():  # type: ignore[no-untyped-def]
                while (request := await service.read(context, timer)) is not None:
                    yield request

            try:
                async for response in super().ServerReflectionInfo(requests(), context):
                    yield response
            except StreamIdle:
                await service.idle(context)
        finally:
            service.streams.leave()


class _Health(health.aio.HealthServicer):
    """Health checking with Check only: a Watch stream would be held for as long as the peer
    likes (orchestrator probes and grpc_health_probe use Check)."""

    async def Watch(self, request, context):  # type: ignore[no-untyped-def,override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Health.Watch is not served; use Health.Check")


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


def add_coordinator_service(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """The generated Coordinator handlers, with FetchParameters sending the serialised messages
    the coordinator makes once per θ version as they are (server/broadcast.py WireCache)."""
    collected = _Handlers()
    pb_grpc.add_CoordinatorServicer_to_server(service, collected)  # type: ignore[arg-type]
    fetch = collected.methods.get("FetchParameters")
    if fetch is None or not fetch.response_streaming:
        raise RuntimeError("the generated Coordinator service has no server-streaming FetchParameters")
    collected.methods["FetchParameters"] = grpc.unary_stream_rpc_method_handler(
        service.FetchParameters, request_deserializer=fetch.request_deserializer, response_serializer=_as_is)
    poll = collected.methods.get("WaitForAssignment")
    if poll is None or poll.request_streaming or poll.response_streaming:
        raise RuntimeError("the generated Coordinator service has no unary WaitForAssignment")
    # the long-poll holds only its own fields while it waits, never the update it carried (PollRequest)
    collected.methods["WaitForAssignment"] = grpc.unary_unary_rpc_method_handler(
        service.WaitForAssignment, request_deserializer=PollRequest.parse, response_serializer=poll.response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, collected.methods),))
    server.add_registered_method_handlers(SERVICE_NAME, collected.methods)


class Server:
    """The coordinator's grpc.aio server, served by an event loop on a thread of its own."""

    def __init__(self, config: ServerConfig, coordinator: Coordinator) -> None:
        self.workers = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="fedmeta-work")
        self.loop = asyncio.new_event_loop()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve_loop, name="fedmeta-grpc-loop", daemon=True)
        self._thread.start()
        coordinator._cond.bind(self.loop)
        try:
            self.server, self.port = self._call(_build(config, coordinator, self.workers))
        except BaseException:
            self._close_loop()
            raise

    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()
            self.workers.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()

    def _call(self, coroutine: Any, timeout: float | None = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self._call(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving: calls in flight get `grace` seconds (None: cancelled now). Returns an event set
        once the server and its loop have stopped (like grpc.Server.stop)."""
        if not self._stopped.is_set():
            try:
                asyncio.run_coroutine_threadsafe(self._halt(grace), self.loop)
            except RuntimeError:  # the loop already closed
                pass
        return self._stopped

    async def _halt(self, grace: float | None) -> None:
        try:
            await self.server.stop(grace)
        finally:
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            self.loop.stop()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


def create_server(config: ServerConfig, coordinator: Coordinator) -> tuple[Server, int]:
    """A started-but-not-serving gRPC server bound to config.host:config.port; returns (server, port)."""
    server = Server(config, coordinator)
    return server, server.port


async def _build(config: ServerConfig, coordinator: Coordinator,
                 workers: futures.ThreadPoolExecutor) -> tuple[grpc.aio.Server, int]:
    max_message = config.run.chunk_bytes + _MESSAGE_OVERHEAD
    interceptors = [TokenInterceptor(TokenStore(Path(config.tokens_file)))] if config.tokens_file else []
    server = grpc.aio.server(
        migration_thread_pool=workers,  # the Admin service's handlers are plain functions
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
            # No automatic growth of HTTP/2 flow-control windows: a stream waiting for an upload
            # slot holds at most its initial window (64 KiB) of its update in the server; its
            # client waits for flow control (+490 MB vs +172 MB for 64 clients x 4 MB before,
            # benchmarks/load_clients.py).
            ("grpc.http2.bdp_probe", 0),
            # Calls that arrived but that the event loop has not picked up yet: gRPC cancels those
            # over 1000 (3000 hard), which a burst of Joins or a round's updates from 1000 clients
            # passes while the loop is busy (benchmarks/load_clients.py: 34,000 bare CANCELLED for
            # 10,000 clients); --max-concurrent-rpcs bounds them instead.
            ("grpc.server.max_pending_requests", config.max_concurrent_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", config.max_concurrent_rpcs),
            *connection_options(config),
        ],
    )
    service = CoordinatorService(coordinator, workers)
    add_coordinator_service(service, server)
    # The Admin service exists only with an admin credential: without one there is nobody it
    # could be for, and a service that is not registered answers UNIMPLEMENTED to every caller.
    admin = AdminCredential.load(config.admin_token_file, config.admin_cert_name, config.tokens_file)
    if admin is not None:
        admin_pb_grpc.add_AdminServicer_to_server(AdminService(coordinator, admin), server)
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
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
