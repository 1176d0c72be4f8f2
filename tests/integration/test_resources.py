"""Bounded resources and identities against a real coordinator on 127.0.0.1 (raw stubs as hostile peers).

A stalled stream, a flood of long-polls, or hundreds of ids that join and never train cost the
federation at most their own contribution: the coordinator keeps answering Join within a
second, frees upload slots, and an honest client's rounds go on at its pace.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedmeta.common import PROTOCOL_VERSION
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.server import checkpoint
from fedmeta.server.certs import generate
from tests.integration.conftest import InProcessServer, wait_for
from tests.integration.test_hostile import encoded, join, session, submit, valid

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
FAST = {"tasks_per_client": 4, "eval_tasks_per_client": 5, "eval_queries": 20}


def _join(server: InProcessServer, client_id: str) -> pb.JoinResponse:
    return server.stub.Join(pb.JoinRequest(client_id=client_id, protocol_version=PROTOCOL_VERSION), timeout=5.0)


def _refused(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---- Part 2: streams, threads, long-polls ------------------------------------------------------------


def test_idle_update_streams_are_cancelled_and_free_their_slots(inprocess_server) -> None:
    """Two sampled clients send a valid header and then nothing: they hold both upload slots until
    --stream-idle-s, then the watchdog cancels them; the honest update waits for a slot, is
    accepted, and the rounds go on."""
    server = inprocess_server(rounds=3, clients_per_round=3, min_clients=1, round_deadline_s=3.0,
                              stream_idle_s=1.0, max_concurrent_uploads=2, **FAST)
    run_id = join(server, "idle-1").run_id
    join(server, "idle-2")
    join(server, "honest")
    idle = [session(server, cid, run_id) for cid in ("idle-1", "idle-2")]
    honest = session(server, "honest", run_id)
    uploads = server.coordinator.upload_slot()
    release = threading.Event()

    def header_then_nothing(s) -> Iterator[pb.SubmitUpdateRequest]:  # type: ignore[no-untyped-def]
        yield pb.SubmitUpdateRequest(header=encoded(s)[0])
        release.wait(60)

    stalled = [s.stub.SubmitUpdate.future(header_then_nothing(s), timeout=60) for s in idle]
    try:
        wait_for(lambda: uploads._value == 0, what="the idle streams to hold both upload slots")
        reply = submit(honest, valid(honest))  # waits for a slot until the watchdog frees one
        assert reply.accepted and not reply.duplicate
        for f in stalled:
            assert f.exception(timeout=10).code() == Code.CANCELLED
        wait_for(lambda: uploads._value == 2, what="both upload slots back")
        # round 0 closed at its deadline with the honest update; round 1 trains the new version
        nxt = session(server, "honest", run_id)
        assert nxt.round == 1 and nxt.version != honest.version
        assert submit(nxt, valid(nxt)).accepted
        wait_for(lambda: server.coordinator.next_round >= 2, timeout_s=20, what="round 1 to close")
    finally:
        release.set()


def test_idle_streams_and_long_polls_hold_no_threads(inprocess_server) -> None:
    """64 long-polls and 64 streams that send nothing, against 4 worker threads: every long-poll
    is held (a coroutine, not a thread), --max-streams 16 streams are held and the rest refused
    with UNAVAILABLE, the process gains no thread per call, and a Join with a one-second
    deadline is answered."""
    server = inprocess_server(rounds=3, clients_per_round=200, min_clients=1, round_deadline_s=120.0,
                              poll_timeout_s=30.0, stream_idle_s=60.0, max_workers=4, max_streams=16)
    ids = [f"poller-{i}" for i in range(64)]
    run_id = join(server, ids[0]).run_id
    for cid in ids[1:]:
        join(server, cid)
    release = threading.Event()

    def nothing() -> Iterator[pb.SubmitUpdateRequest]:
        release.wait(60)
        yield from ()

    streams = [server.stub.SubmitUpdate.future(nothing(), timeout=60) for _ in ids]
    polls = [server.stub.WaitForAssignment.future(pb.WaitForAssignmentRequest(run_id=run_id, client_id=cid), timeout=60)
             for cid in ids]
    try:
        wait_for(lambda: sum(f.done() for f in streams) >= 48, what="the streams over --max-streams to be refused")
        wait_for(lambda: sum(c.polling for c in server.coordinator.registry.clients.values()) == 64,
                 what="all 64 long-polls to be waiting")
        reply = server.stub.Join(pb.JoinRequest(client_id="late", protocol_version=PROTOCOL_VERSION), timeout=1.0)
        assert reply.config.run_id == run_id
        server.stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, client_id="late"), timeout=1.0)
        refused = [f.exception() for f in streams if f.done()]
        assert len(refused) == 48
        assert {e.code() for e in refused} == {Code.UNAVAILABLE} and "retry" in refused[0].details()
        assert not any(f.done() for f in polls), "a waiting long-poll is answered only when it has work or times out"
        # the coordinator's threads: its event loop, its 4 workers, the round thread (this test's
        # client side has a thread per request stream, named otherwise)
        server_threads = [t.name for t in threading.enumerate() if t.name.startswith("fedmeta-")]
        assert len(server_threads) <= 6, server_threads
        # one long-poll per client id: a second one from a held id is answered at once, not in 30 s
        again = server.stub.WaitForAssignment(pb.WaitForAssignmentRequest(run_id=run_id, client_id=ids[0]), timeout=2.0)
        assert again.action == pb.ACTION_WAIT
        # Health.Watch would be held for as long as the peer likes: only Check is served
        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=2.0)
        assert _refused(lambda: next(watch)).code() == Code.UNIMPLEMENTED
    finally:
        release.set()
        for f in streams + polls:
            f.cancel()


def test_second_upload_from_the_same_id_is_refused_while_the_first_streams(inprocess_server) -> None:
    server = inprocess_server(rounds=3, clients_per_round=1, min_clients=1, round_deadline_s=30.0, stream_idle_s=30.0)
    s = session(server, "alice", join(server, "alice").run_id)
    release = threading.Event()

    def slow() -> Iterator[pb.SubmitUpdateRequest]:
        yield from valid(s)[:-1]
        release.wait(30)
        yield valid(s)[-1]

    first = s.stub.SubmitUpdate.future(slow(), timeout=30)
    try:
        wait_for(lambda: server.coordinator.upload_slot()._value == 1, what="the first upload to take a slot")
        err = _refused(lambda: submit(s, valid(s)))
        assert err.code() == Code.UNAVAILABLE and "already streaming" in err.details()
        assert server.coordinator.next_round == 0
    finally:
        release.set()
    assert first.result(timeout=10).accepted
    assert submit(s, valid(s)).duplicate  # the retry the honest client makes is acknowledged once


# ---- Part 6: identities ----------------------------------------------------------------------------------


def test_two_hundred_fake_ids_do_not_stall_an_honest_client(inprocess_server, processes, caplog) -> None:
    """200 ids join, heartbeat and long-poll but never train; one real client process trains.
    Round 0 cannot tell them apart (each missed deadline samples 4x more ids); from round 1 on
    the honest client, having answered, is sampled first, no round waits for a deadline, and
    fake ids get a seat only in exploration rounds whose gap doubles after each silent one."""
    caplog.set_level(logging.INFO, logger="fedmeta.coordinator")
    rounds = 10
    server = inprocess_server(rounds=rounds, clients_per_round=2, min_clients=1, round_deadline_s=1.5,
                              poll_timeout_s=1.0, joins_per_s=100.0, **FAST)
    fakes = [f"fake-{i:03d}" for i in range(200)]
    run_id = join(server, fakes[0]).run_id
    for cid in fakes[1:]:
        join(server, cid)
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.is_set():
            for cid in fakes:
                try:
                    server.stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, client_id=cid, round=0), timeout=5.0)
                except grpc.RpcError:
                    pass
            stop.wait(1.0)

    def long_polls(cid: str) -> None:
        while not stop.is_set():
            try:
                server.stub.WaitForAssignment(pb.WaitForAssignmentRequest(run_id=run_id, client_id=cid), timeout=5.0)
            except grpc.RpcError:
                stop.wait(0.5)

    threads = [threading.Thread(target=heartbeats, daemon=True)]
    threads += [threading.Thread(target=long_polls, args=(cid,), daemon=True) for cid in fakes[:8]]
    for t in threads:
        t.start()
    try:
        honest = processes.client(server.port, "honest", 7)
        assert honest.wait(120) == 0, honest.output()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    records = [json.loads(line) for line in server.coordinator.rundir.metrics_path.read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds))
    later = records[1:]
    assert all(r["clients_answered"] == 1 for r in later)
    with_fakes = [r["round"] for r in later if r["clients_sampled"] > 1]
    assert len(with_fakes) <= 3, with_fakes  # exploration rounds 1, 3, 7: gaps double
    assert [r["clients_sampled"] for r in records[-2:]] == [1, 1]
    stalled = {int(m[1]) for rec in caplog.records if (m := re.match(r"round (\d+): deadline passed", rec.getMessage()))}
    assert stalled <= {0}, f"rounds {sorted(stalled)} waited for their deadline"
    summary = server.coordinator.summary
    assert summary is not None and summary["clients_seen"] == 201
    meta = checkpoint.load(server.coordinator.rundir.checkpoint_dir).meta
    assert meta["clients_seen"] == 201 and meta["clients"]["honest"]["answered"] == rounds


def test_registry_is_capped(inprocess_server) -> None:
    server = inprocess_server(max_clients=3, clients_per_round=4)
    for cid in ("a", "b", "c"):
        _join(server, cid)
    err = _refused(lambda: _join(server, "d"))
    assert err.code() == Code.RESOURCE_EXHAUSTED and "--max-clients" in err.details()
    _join(server, "a")  # a known id may always rejoin
    server.stub.Leave(pb.LeaveRequest(run_id=server.coordinator.run.run_id, client_id="a"), timeout=5.0)
    assert _join(server, "d").config.run_id  # a full registry forgets clients that left first
    assert len(server.coordinator._clients) == 3


def test_allow_list_refuses_other_ids(inprocess_server, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("alice\nbob\n")
    server = inprocess_server(allowed_clients=str(allowed))
    run_id = _join(server, "alice").config.run_id
    for call in (lambda: _join(server, "mallory"),
                 lambda: server.stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, client_id="mallory"), timeout=5.0)):
        err = _refused(call)
        assert err.code() == Code.PERMISSION_DENIED and "--allowed-clients" in err.details()
    assert "mallory" not in server.coordinator._clients


def test_join_rate_is_limited_per_peer(inprocess_server) -> None:
    server = inprocess_server(joins_per_s=0.1)  # a burst of one Join, then one per 10 s
    _join(server, "first")
    err = _refused(lambda: _join(server, "second"))
    assert err.code() == Code.RESOURCE_EXHAUSTED and "--joins-per-s" in err.details()
    assert "second" not in server.coordinator._clients


def test_silent_clients_are_forgotten(inprocess_server) -> None:
    server = inprocess_server(forget_client_s=1.0, clients_per_round=4)
    run_id = _join(server, "ghost").config.run_id
    wait_for(lambda: "ghost" not in server.coordinator._clients, timeout_s=20, what="the registry to forget ghost")
    err = _refused(lambda: server.stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, client_id="ghost"), timeout=5.0))
    assert err.code() == Code.NOT_FOUND and "call Join" in err.details()
    assert _join(server, "ghost").config.run_id == run_id  # and it may come back


def test_tls_without_client_authentication_is_announced(inprocess_server, tmp_path: Path, caplog) -> None:
    generate(tmp_path, server_names=["localhost", "127.0.0.1"], clients=[])
    caplog.set_level(logging.WARNING, logger="fedmeta.service")
    inprocess_server(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server-key.pem"))
    assert any("TLS WITHOUT CLIENT AUTHENTICATION" in r.getMessage() for r in caplog.records)


def test_parameter_streams_wait_for_a_download_slot(inprocess_server) -> None:
    """--max-concurrent-downloads 1: a peer that reads a 4 MB θ's header and then nothing holds
    the one sending slot (its chunk waits for its flow-control window); a second client's fetch
    waits for the slot instead of buffering another copy, and gets θ whole once the first
    stream is gone. Memory under concurrency: slots x chunk, not clients x model."""
    from fedmeta.common.transfer import receive_parameters

    server = inprocess_server(rounds=2, clients_per_round=2, min_clients=1, task="gaussian", dim=16000,
                              max_concurrent_downloads=1, **FAST)
    run_id = join(server, "slow").run_id
    join(server, "next")
    a = {cid: server.stub.WaitForAssignment(pb.WaitForAssignmentRequest(run_id=run_id, client_id=cid), timeout=30)
         for cid in ("slow", "next")}
    version = a["slow"].parameter_version
    downloads = server.coordinator.download_slot()
    # the slow peer's own channel: no window growth, so the server's first chunk waits for it
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    slow = pb_grpc.CoordinatorStub(channel).FetchParameters(
        pb.FetchParametersRequest(run_id=run_id, client_id="slow", parameter_version=version), timeout=60)
    assert next(slow).HasField("header")
    wait_for(lambda: downloads._value == 0, what="the stalled stream to hold the download slot")
    got: dict[str, object] = {}

    def fetch_next() -> None:
        request = pb.FetchParametersRequest(run_id=run_id, client_id="next", parameter_version=version)
        try:
            got["params"] = receive_parameters(server.stub.FetchParameters(request, timeout=60), max_bytes=1 << 24)
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            got["error"] = exc

    thread = threading.Thread(target=fetch_next)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive(), got  # waiting for the slot, not sending
    assert downloads._value == 0
    slow.cancel()
    thread.join(timeout=30)
    assert not thread.is_alive() and "error" not in got, got
    got_version, params = got["params"]  # type: ignore[misc]
    assert got_version == version and sum(t.numel() for t in params.values()) > 1_000_000
    wait_for(lambda: downloads._value == 1, what="the download slot back")
    channel.close()
