"""The live dashboard: a static page (server/dashboard_static/) polling /api/status, over the standard
library's ThreadingHTTPServer, which faces a network and is bounded accordingly.

/api/status serves the Admin service's snapshot (server/status.py) as JSON (proto field
names). The dashboard only reads: every action goes through the Admin service.

- Bounds: at most MAX_THREADS requests at once (more are answered 503 and closed), a
  socket timeout of TIMEOUT_S on every read and write, http.server's own caps on the
  request line (64 KiB) and headers (100), GET and HEAD only, no request body read, a
  fixed set of paths.
- Beyond loopback the coordinator refuses to start without --admin-token-file, and
  /api/status wants `Authorization: Bearer ADMIN_TOKEN` (compared in constant time);
  with --tls-cert/--tls-key it serves HTTPS. On loopback the Host header must name
  loopback (a DNS-rebinding page cannot read the status).
- The page escapes all peer-originated text (textContent only) and a Content-Security-Policy
  allows only its own script and style.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format

from fedmeta.common.net import is_loopback
from fedmeta.common.textsafe import clip
from fedmeta.server.admin_auth import AdminCredential
from fedmeta.server.config import ServerConfig
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.status import snapshot

log = logging.getLogger("fedmeta.dashboard")
STATIC = Path(__file__).resolve().parent / "dashboard_static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
         "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
MAX_THREADS = 8
TIMEOUT_S = 10.0
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, board: Dashboard) -> None:
        self.board = board
        self.slots = threading.BoundedSemaphore(MAX_THREADS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer's broken request (plain HTTP to HTTPS, a reset, a timeout): one debug line, no traceback."""
        import sys

        log.debug("dashboard request from %s failed: %s", clip(client_address, 60), clip(sys.exc_info()[1], 200))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "fedmeta-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", clip(self.address_string(), 60), clip(format % args, 200))

    def _send(self, status: int, body: bytes, content_type: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, head_only: bool = False) -> None:
        self.close_connection = True
        self._send(status, json.dumps({"error": message}).encode(), "application/json", head_only)

    def do_HEAD(self) -> None:
        self.do_GET(head_only=True)

    def do_GET(self, head_only: bool = False) -> None:
        board = self.server.board
        if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
            return self._error(HTTPStatus.BAD_REQUEST, "GET requests carry no body", head_only)
        if board.loopback and not _loopback_host(self.headers.get("Host", "")):
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "this dashboard answers only to a loopback Host",
                               head_only)
        url = urlsplit(self.path)
        if url.path == "/api/status":
            if board.credential is not None and not board.credential.token_ok(self.headers.get("Authorization", "")):
                return self._error(HTTPStatus.UNAUTHORIZED, "the dashboard's status needs the admin token "
                                   "(Authorization: Bearer TOKEN)", head_only)
            return self._status(url.query, head_only)
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", True)
        found = FILES.get(url.path)
        if found is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such page", head_only)
        name, content_type = found
        self._send(HTTPStatus.OK, board.files[name], content_type, head_only)

    def _status(self, query: str, head_only: bool) -> None:
        params = parse_qs(query[:200], max_num_fields=4)
        try:
            offset = int(params.get("offset", ["0"])[0])
            limit = int(params.get("limit", ["0"])[0])
            if not (0 <= offset <= 10**7 and 0 <= limit <= 10**4):
                raise ValueError
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "offset and limit: expected small non-negative integers",
                               head_only)
        message = snapshot(self.server.board.coordinator, offset=offset, limit=limit)
        body = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None,
                                         always_print_fields_with_no_presence=True).encode()
        self._send(HTTPStatus.OK, body, "application/json", head_only)


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in _LOOPBACK_NAMES


@dataclass
class Dashboard:
    coordinator: Coordinator
    credential: AdminCredential | None
    loopback: bool
    files: dict[str, bytes]
    url: str = ""
    httpd: _Server | None = None
    thread: threading.Thread | None = None

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def start_dashboard(config: ServerConfig, coordinator: Coordinator) -> Dashboard:
    """Bind --dashboard-host:--dashboard-port and serve in a daemon thread; returns the running dashboard."""
    host, port = config.dashboard_host, config.dashboard_port
    assert port is not None
    loopback = is_loopback(host)
    credential = None
    if not loopback:
        credential = AdminCredential.load(config.admin_token_file, None, config.tokens_file)
        if credential is None or credential.token_sha256 is None:  # server/config.py refuses this at start-up
            raise ValueError(f"--dashboard-host {host}: needs --admin-token-file")
    files = {name: (STATIC / name).read_bytes() for name, _ in FILES.values()}
    board = Dashboard(coordinator, credential, loopback, files)
    try:
        httpd = _Server((host, port), _Handler, board)
    except OSError as exc:
        raise OSError(f"--dashboard-port: cannot bind {host}:{port}: {exc.strerror}") from None
    scheme = "http"
    if config.tls_cert is not None and config.tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.tls_cert, config.tls_key)
        # The handshake happens on the handler thread's first read (under its timeout), not in accept().
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    board.httpd = httpd
    shown = f"[{host}]" if ":" in host else host
    board.url = f"{scheme}://{shown}:{httpd.server_address[1]}/"
    board.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                    name="fedmeta-dashboard", daemon=True)
    board.thread.start()
    return board
