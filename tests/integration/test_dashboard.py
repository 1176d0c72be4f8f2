"""The live dashboard: in headless Chromium during a run with real client processes, and its HTTP
bounds and credential checks against raw sockets."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
from pathlib import Path

import grpc
import pytest

from fedmeta.common.proto import pb, pb_grpc
from fedmeta.server.dashboard import MAX_THREADS, start_dashboard
from tests.integration.conftest import ROOT, wait_for

pytestmark = pytest.mark.integration

TOKEN = "fedcba9876543210" * 4
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def _browser():  # type: ignore[no-untyped-def]
    """A headless Chromium driven by selenium; skips without one unless FEDMETA_REQUIRE_BROWSER=1."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"no browser for the dashboard test: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("FEDMETA_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; FEDMETA_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(message)
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")  # type: ignore[assignment]
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def test_dashboard_in_headless_chromium_during_a_live_run(processes, tmp_path: Path) -> None:
    browser = _browser()
    try:
        server = processes.server(tmp_path / "maml-sinusoid-demo", "--rounds", "2000", "--clients-per-round", "2",
                                  "--eval-every", "25", "--dashboard-port", "0", "--round-deadline-s", "5", "--tasks-per-client", "2",
                                  "--val-tasks-per-client", "4")
        line = wait_for(lambda: next((x for x in server.lines if x.startswith("dashboard on ")), None), timeout_s=30,
                        what="the dashboard address")
        url = line.split()[-1]
        for i in range(2):
            processes.client(server.port, f"site-{i}", i)
        browser.get(url)
        rounds = lambda: int(browser.find_element("id", "round").text or "0")  # noqa: E731
        first = wait_for(lambda: rounds() >= 1 and rounds(), timeout_s=90, interval_s=0.2,
                         what="the page's round counter to show a round")
        # a hostile peer's text reaches the page (it joins once the sites are proven: sampled with them in
        # round 0 it would hold that round to its deadline)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            stub.Join(pb.JoinRequest(client_id="intruder", protocol_version=1, device=HOSTILE), timeout=20)
            with pytest.raises(grpc.RpcError):
                stub.WaitForAssignment(pb.WaitForAssignmentRequest(client_id="intruder", run_id=HOSTILE), timeout=20)
        wait_for(lambda: rounds() >= first + 100 and browser.find_element("id", "val-last").text, timeout_s=90,
                 interval_s=0.2, what="the round counter to advance and a validation to show")
        refusals = browser.find_element("id", "refusals").text
        assert "WRONG_RUN" in refusals and "<img src=x" in refusals  # shown as text, never parsed as HTML
        assert browser.title == "fedmeta dashboard"
        assert "site-0" in browser.find_element("id", "clients").text
        assert browser.find_elements("css selector", "#loss-chart polyline")
        out = ROOT / "docs" / "images"
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "dashboard.png"))
        assert (out / "dashboard.png").stat().st_size > 10_000
    finally:
        browser.quit()


def _get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_beyond_loopback_the_status_needs_the_admin_token(inprocess_server, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN)
    s = inprocess_server(admin_token_file=str(tmp_path / "admin.token"), dashboard_port=0, dashboard_host="0.0.0.0",
                         insecure=True)
    board = start_dashboard(s.coordinator.config, s.coordinator)
    try:
        port = board.httpd.server_address[1]  # type: ignore[union-attr]
        assert _get(port, "/")[0] == 200  # the page holds no data
        assert _get(port, "/api/status")[0] == 401
        assert _get(port, "/api/status", {"Authorization": "Bearer " + TOKEN[:-1] + "1"})[0] == 401
        status, body = _get(port, "/api/status", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["run"]["run_id"] == s.coordinator.run.run_id
        assert _get(port, "/api/status?limit=-1", {"Authorization": f"Bearer {TOKEN}"})[0] == 400
        assert _get(port, "/../etc/passwd")[0] == 404
        assert _get(port, "/api/status", method="POST")[0] == 501
        assert _get(port, "/", {"X-Big": "x" * 70_000})[0] == 431
    finally:
        board.close()


def test_loopback_dashboard_checks_host_and_bounds_its_threads(inprocess_server) -> None:
    s = inprocess_server(dashboard_port=0)
    board = start_dashboard(s.coordinator.config, s.coordinator)
    try:
        port = board.httpd.server_address[1]  # type: ignore[union-attr]
        assert _get(port, "/api/status")[0] == 200
        assert _get(port, "/api/status", {"Host": "rebind.example"})[0] == 421  # DNS rebinding
        idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(MAX_THREADS)]
        try:
            assert _get(port, "/api/status")[0] == 503  # every handler thread is held by an idle peer
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: _get(port, "/api/status")[0] == 200, timeout_s=30, what="the threads to be freed")
    finally:
        board.close()
