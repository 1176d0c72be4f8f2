"""The gRPC face of the coordinator: the Coordinator service's RPC handlers, on grpc.aio.

Every handler is a coroutine on the server's event loop (server/grpc_server.py): a waiting
long-poll, a stream waiting for an upload slot and a stream waiting on its peer hold no
thread. What costs CPU in proportion to the model (decoding and checking a streamed update,
adding it to the round's aggregate, serialising a new θ for the parameter streams) runs on the
worker threads (--max-workers), off the loop; the rest are short calls under the
coordinator's lock, an inline update's (at most 64 KiB) included.

Memory under concurrency is O(model): an update's payload is read only once it holds one of
--max-concurrent-uploads slots; the streams waiting for a slot read nothing, so HTTP/2 flow
control holds their data in the clients (a stream's window, 64 KiB, is all the coordinator
buffers for it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import Executor
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from fedmeta.common import PROTOCOL_VERSION
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.codec import EncodedTensorSet, TensorSetError, TensorSetTooLarge, decode
from fedmeta.common.config import check_client_id
from fedmeta.common.logformat import fields
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.common.refusal import Reason
from fedmeta.common.textsafe import RateLimit, clip
from fedmeta.common.transfer import (INLINE_UPDATE_MAX_BYTES, UPDATE, WireBytes, collect_inline_update,
                                     collect_tensor_set)
from fedmeta.common.wire import header_from_proto, header_to_proto, run_config_to_proto
from fedmeta.server.auth import CLIENT_ID_KEY
from fedmeta.server.config import read_allowed_clients
from fedmeta.server.coordinator import Action, Coordinator, UpdateMeta
from fedmeta.server.errors import MAX_MESSAGE_CHARS, Rejected, refusal_of, refusals
from fedmeta.server.limits import Gate, JoinRateLimiter, KeyedGate, StreamIdle, StreamTimer, peer_address

log = logging.getLogger("fedmeta.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
_ACTIONS = {
    Action.TRAIN: pb.ACTION_TRAIN,
    Action.EVALUATE: pb.ACTION_EVALUATE,
    Action.WAIT: pb.ACTION_WAIT,
    Action.FINISHED: pb.ACTION_FINISHED,
}
_KINDS = {
    pb.UPDATE_KIND_META_GRADIENT: UpdateKind.META_GRADIENT,
    pb.UPDATE_KIND_PARAMETER_DELTA: UpdateKind.PARAMETER_DELTA,
    pb.UPDATE_KIND_EVALUATION: None,
}
_MESSAGE_OVERHEAD = 64 * 1024
T = TypeVar("T")
Context = grpc.aio.ServicerContext
POLL_JITTER = 0.25  # a long-poll is held for (1 - POLL_JITTER * U[0, 1)) x --poll-timeout-s
# A call that may wait (a long-poll, a fetch waiting for a sending slot) holds its request while it
# waits, and waiting costs no thread: an honest one is under 200 bytes (ids and a version digest),
# so a peer padding them to the message limit (1 MiB) is refused before it waits.
MAX_WAITING_REQUEST_BYTES = 4096


def check_small(request: Any, rpc: str) -> None:
    size = request.ByteSize()
    if size > MAX_WAITING_REQUEST_BYTES:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{rpc} request of {size} bytes; at most "
                       f"{MAX_WAITING_REQUEST_BYTES} are accepted (ids and a parameter version)", identity=True)


class PollRequest:
    """A WaitForAssignment request as its handler gets it (server/grpc_server.py registers
    PollRequest.parse as the method's deserialiser): the poll's own fields, and the update it may
    carry, handed out once by take(). grpc.aio keeps the deserialised request alive for the whole
    call and a protobuf message keeps its input until it is freed, so a long-poll that parked the
    whole message would hold the carried update (up to 64 KiB) for as long as it waits: 10,000
    waiting clients, 640 MB. Taken and dropped, the update costs only while it is checked."""

    __slots__ = ("poll", "_full")

    def __init__(self, full: pb.WaitForAssignmentRequest) -> None:
        self.poll = pb.WaitForAssignmentRequest(run_id=full.run_id, client_id=full.client_id,
                                                held_version=full.held_version)
        self._full: pb.WaitForAssignmentRequest | None = full if full.HasField("update") else None

    @classmethod
    def parse(cls, raw: bytes) -> PollRequest:
        return cls(pb.WaitForAssignmentRequest.FromString(raw))

    @property
    def client_id(self) -> str:  # what server/errors.py counts a refusal against
        return self.poll.client_id

    def take(self) -> pb.WaitForAssignmentRequest | None:
        """The whole request, if it carried an update; from then on this object holds only the poll."""
        full, self._full = self._full, None
        return full


def certificate_names(context: Context) -> list[str]:
    """The CN and SANs of the peer's verified client certificate (empty without mutual TLS)."""
    auth = context.auth_context()
    raw = auth.get("x509_common_name", []) + auth.get("x509_subject_alternative_name", [])
    return [n.decode(errors="replace") for n in raw]


def _peer_client(first: pb.SubmitUpdateRequest | None) -> str:
    if first is None or not first.HasField("header"):
        return "an unknown client"
    return repr(clip(first.header.client_id, 64))


def _peer_host(context: Context) -> str:
    """The peer's address without its port ("ipv4:10.0.0.7"): one key per machine, not per connection."""
    peer = context.peer() or "unknown"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return clip(host, 80)


# Refusal lines per peer machine per minute; past it one line says so and the next minute counts them.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW_S = 60.0


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Translates RPCs into Coordinator calls; @refusals turns Rejected into status codes and reasons."""

    def __init__(self, coordinator: Coordinator, workers: Executor) -> None:
        self.coordinator = coordinator
        self.workers = workers
        self.run = coordinator.run
        config = coordinator.config
        self.require_client_cert = config.require_client_cert
        self.tokens = config.tokens_file is not None
        self.admin_name = config.admin_cert_name
        self._jitter = random.Random()  # spreads the long-polls' hold times; θ never depends on it
        self._refusals = RateLimit(burst=REFUSAL_LOG_BURST, window_s=REFUSAL_LOG_WINDOW_S)
        self.allowed = read_allowed_clients(Path(config.allowed_clients)) if config.allowed_clients else None
        self.streams = Gate(config.max_streams)  # open update and parameter streams (each: a window of memory)
        self.uploading = KeyedGate()
        self.stream_idle_s = config.stream_idle_s
        self.joins = JoinRateLimiter(config.joins_per_s)

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """Run O(model) work on the worker threads, not the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, work, *args)

    def timer(self) -> StreamTimer:
        return StreamTimer(self.stream_idle_s)

    @staticmethod
    async def read(context: Context, timer: StreamTimer) -> Any:
        """The next request message, None at the stream's end; StreamIdle if the peer stalls."""
        message = await timer.bounded(context.read())
        return None if message is grpc.aio.EOF else message

    async def idle(self, context: Context) -> None:
        log.info("stream from %s cancelled: no progress for %g s (--stream-idle-s)", context.peer(), self.stream_idle_s)
        await context.abort(grpc.StatusCode.CANCELLED, f"the coordinator ended this stream: no progress for "
                            f"{self.stream_idle_s:g} s (--stream-idle-s)")

    def note_refusal(self, client_id: str, code: grpc.StatusCode, message: str, reason: Reason | None) -> None:
        """Counted for the status snapshot (server/clientstats.py), per reason and per joined client."""
        self.coordinator.stats.refused(client_id, reason.value if reason is not None else code.name, message)

    def _log_refusal(self, context: Context, first: pb.SubmitUpdateRequest | None, code: str,
                     message: str) -> None:
        """One bounded line per refused update, at most REFUSAL_LOG_BURST per peer machine per minute."""
        peer = _peer_host(context)
        allowed, earlier = self._refusals.allow(peer)
        if earlier:
            log.warning("suppressed %d more refused updates from %s in the minute before", earlier, peer)
        if allowed:
            header = first.header if first is not None and first.HasField("header") else None
            log.warning("update from %s refused (%s): %s (peer %s)", _peer_client(first), code,
                        clip(message, MAX_MESSAGE_CHARS), peer,
                        extra=fields(event="update_refused", round=None if header is None else int(header.round),
                                     client=None if header is None else clip(header.client_id, 64)))
        elif self._refusals.suppressed(peer) == 1:
            log.warning("over %d refused updates from %s this minute: not logging more of them until it ends",
                        REFUSAL_LOG_BURST, peer)

    def _client_id(self, context: Context, client_id: str) -> str:
        """A well-formed client id that, under mutual TLS, the peer's certificate names."""
        denied = grpc.StatusCode.PERMISSION_DENIED
        try:
            check_client_id(client_id)
        except ValueError as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"client_id: {clip(exc, MAX_MESSAGE_CHARS)}",
                           Reason.BAD_CLIENT_ID, identity=True) from None
        if client_id == self.admin_name:
            raise Rejected(denied, f"client id {client_id!r} is the operator's certificate name (--admin-cert-name); "
                           "no client may join under it", Reason.NOT_ALLOWED, identity=True)
        if self.allowed is not None and client_id not in self.allowed:
            raise Rejected(denied, f"client id {client_id!r} is not in the coordinator's --allowed-clients list",
                           Reason.NOT_ALLOWED, identity=True)
        if self.tokens:
            authenticated = dict(context.invocation_metadata()).get(CLIENT_ID_KEY)
            if client_id != authenticated:
                raise Rejected(denied, f"client id {client_id!r} is not the id the token was checked for "
                               f"({authenticated!r})", Reason.NOT_ALLOWED, identity=True)
        if self.require_client_cert:
            names = certificate_names(context)
            if client_id not in names:
                raise Rejected(denied, f"client id {client_id!r} does not match the client certificate (it names "
                               f"{names}); use the id the certificate was issued for", Reason.NOT_ALLOWED, identity=True)
        return client_id

    @refusals
    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        client_id = self._client_id(context, request.client_id)
        if not self.joins.allow(peer_address(context)):
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"too many Join calls from {peer_address(context)} (--joins-per-s "
                           f"{self.coordinator.config.joins_per_s:g}); retry after a pause", Reason.BUSY)
        if request.protocol_version != PROTOCOL_VERSION:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"protocol version {request.protocol_version} is not supported; this coordinator speaks "
                           f"version {PROTOCOL_VERSION}: install a matching fedmeta release", Reason.BAD_PROTOCOL)
        config = self.coordinator.join(client_id, device=clip(request.device, 64), num_tasks=request.num_tasks)
        response = pb.JoinResponse(config=run_config_to_proto(config), poll_takes_update=True)
        self.coordinator.count_bytes(sent=response.ByteSize(), received=request.ByteSize(), client=client_id)
        return response

    @refusals
    async def WaitForAssignment(
        self, request: PollRequest | pb.WaitForAssignmentRequest, context: Context
    ) -> pb.WaitForAssignmentResponse:
        """Holds no thread while it waits (Coordinator.wait is a coroutine); one per client id. An
        update it carries is taken as SubmitInlineUpdate takes one, after the poll's own checks and
        before the wait; a refused update ends the call with that refusal."""
        if not isinstance(request, PollRequest):
            request = PollRequest(request)
        check_small(request.poll, "WaitForAssignment")
        client_id = self._client_id(context, request.poll.client_id)
        self.coordinator.check_run(request.poll.run_id)
        ack = None
        carried = request.take()
        if carried is not None:
            ack = await self._carried(carried.update, client_id, context)
            carried = None  # the update's bytes go now, not when the long-poll ends
        poll = request.poll
        # Held for 3/4 to all of --poll-timeout-s: idle clients that joined together would otherwise
        # all re-poll together every poll timeout (benchmarks/load_clients.py, 9,000 idle clients:
        # one wave of re-polls every 30 s slowed the rounds it hit by half).
        timeout = self.run.poll_timeout_s * (1.0 - POLL_JITTER * self._jitter.random())
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 0.5))
        a = await self.coordinator.wait(client_id, timeout)
        response = pb.WaitForAssignmentResponse(
            action=_ACTIONS[a.action], round=a.round, parameter_version=a.version, detail=a.detail,
            validation=a.validation, update=ack,
        )
        if a.action in (Action.TRAIN, Action.EVALUATE) and poll.held_version != a.version:
            inline = self.coordinator.inline_parameters(a.version)
            if inline is not None:
                response.parameters.tensors.CopyFrom(header_to_proto(inline[0]))
                response.parameters.payload = inline[1]
        self.coordinator.count_bytes(sent=response.ByteSize(), received=poll.ByteSize(), client=client_id)
        return response

    @refusals
    async def FetchParameters(self, request: pb.FetchParametersRequest, context: Context) -> None:
        if not self.streams.try_enter():
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly", Reason.BUSY)
        try:
            await self._fetch(request, context)
        except StreamIdle:
            await self.idle(context)
        finally:
            self.streams.leave()

    async def _fetch(self, request: pb.FetchParametersRequest, context: Context) -> None:
        check_small(request, "FetchParameters")
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        # Each sending stream holds about three copies of a chunk (the message, its serialised
        # bytes, gRPC's buffer) until the peer's window takes it: a bounded number send at once,
        # so memory stays O(model + slots x chunk) however many clients fetch together.
        slot = self.coordinator.download_slot()
        try:
            await asyncio.wait_for(slot.acquire(), timeout=self.coordinator.config.round_deadline_s)
        except TimeoutError:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many parameter streams are sending; retry shortly",
                           Reason.BUSY) from None
        try:
            encoded: EncodedTensorSet = self.coordinator.acquire_parameters(client_id, request.parameter_version)
            sent = 0
            timer = self.timer()
            try:
                # serialised once per version (off the loop) and sent as they are (server/grpc_server.py
                # registers FetchParameters with a serialiser that passes bytes through)
                wire = await self.off_loop(self.coordinator.parameter_wire, request.parameter_version, encoded)
                for data, counted in wire:
                    await timer.bounded(context.write(data))  # waits for the peer's flow-control window
                    sent += counted
            finally:
                self.coordinator.release_parameters()
                self.coordinator.count_bytes(sent=sent, received=request.ByteSize(), client=client_id)
        finally:
            slot.release()

    @refusals
    async def SubmitUpdate(self, request_iterator: Any, context: Context) -> pb.SubmitUpdateResponse:
        """Bounded per call: a stream slot (--max-streams), one upload per client id, an upload slot
        before the payload is read, and --stream-idle-s for each wait on the peer."""
        try:
            return await self._submit_bounded(context)
        except (Rejected, TensorSetError) as exc:
            refusal = refusal_of(exc)
            self.coordinator.telemetry.update_refused(refusal.reason if refusal is not None else None)
            raise

    async def _submit_bounded(self, context: Context) -> pb.SubmitUpdateResponse:
        if not self.streams.try_enter():
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly", Reason.BUSY)
        claimed: list[str] = []
        try:
            return await self._submit(context, self.timer(), lambda cid: self._claim(cid, claimed))
        except StreamIdle:
            await self.idle(context)
            raise AssertionError("unreachable") from None  # abort raises
        finally:
            for cid in claimed:
                self.uploading.leave(cid)
            self.streams.leave()

    def _claim(self, client_id: str, claimed: list[str]) -> None:
        """One upload per client id at a time: a second one is refused with UNAVAILABLE, which an
        honest client retries (its first attempt, still streaming, then ends as accepted or not)."""
        if not self.uploading.try_enter(client_id):
            raise Rejected(grpc.StatusCode.UNAVAILABLE,
                           f"an update from client {client_id!r} is already streaming in; retry when it ends",
                           Reason.BUSY)
        claimed.append(client_id)

    async def _submit(self, context: Context, timer: StreamTimer, claim: Callable[[str], None]) -> pb.SubmitUpdateResponse:
        """The header is admitted (server/admission.py) before any chunk is read; the payload is read
        once an upload slot is free; the tensors are committed (bounds, norm filter, counted once,
        off the loop) after the end message."""
        return await self._take(context, claim, _StreamBody(self, context, timer))

    @refusals
    async def SubmitInlineUpdate(self, request: pb.InlineUpdate, context: Context) -> pb.SubmitUpdateResponse:
        """SubmitUpdate in one message, for payloads of at most INLINE_UPDATE_MAX_BYTES: the same
        admission, answers and exactly-once; bounded by the stream slots (--max-streams) and one
        upload per client id, and it never waits (its payload is already here, and small)."""
        return await self._inline(request, context)

    async def _carried(self, update: pb.InlineUpdate, client_id: str, context: Context) -> pb.SubmitUpdateResponse:
        """The update a WaitForAssignment carries: the poller's own, taken as SubmitInlineUpdate's."""
        self.coordinator.telemetry.update_carried()
        if update.HasField("header") and update.header.client_id != client_id:
            self.coordinator.telemetry.update_refused(Reason.BAD_CLIENT_ID)
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"the update carried by WaitForAssignment names client "
                           f"{clip(update.header.client_id, 64)!r}, the poll {client_id!r}: a client carries only "
                           "its own update", Reason.BAD_CLIENT_ID)
        return await self._inline(update, context)

    async def _inline(self, request: pb.InlineUpdate, context: Context) -> pb.SubmitUpdateResponse:
        try:
            if not self.streams.try_enter():
                raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many updates are open; retry shortly", Reason.BUSY)
            claimed: list[str] = []
            try:
                return await self._take(context, lambda cid: self._claim(cid, claimed), _InlineBody(self, request))
            finally:
                for cid in claimed:
                    self.uploading.leave(cid)
                self.streams.leave()
        except (Rejected, TensorSetError) as exc:
            refusal = refusal_of(exc)
            self.coordinator.telemetry.update_refused(refusal.reason if refusal is not None else None)
            raise

    async def _take(self, context: Context, claim: Callable[[str], None], body: _StreamBody | _InlineBody
                    ) -> pb.SubmitUpdateResponse:
        """Admit an update's header, then take its body (a stream's or an inline update's)."""
        first = None
        client = None
        try:
            first = await body.first()
            meta = self._meta(first.header, context)
            client = meta.client_id  # checked against its token or certificate: refusals count against it
            ticket = self.coordinator.admit(meta)
            claim(ticket.meta.client_id)  # after the header checks: only a sampled client's id is held
            if ticket.duplicate:
                await body.drain()
                return pb.SubmitUpdateResponse(accepted=True, duplicate=True)
            if not ticket.carries_tensors:
                await body.no_payload()
                duplicate = self.coordinator.commit(ticket, None)
                return pb.SubmitUpdateResponse(accepted=True, duplicate=duplicate)
            duplicate = await body.commit(ticket)
            return pb.SubmitUpdateResponse(accepted=True, duplicate=duplicate)
        except (Rejected, TensorSetError) as exc:
            refusal = refusal_of(exc)
            if refusal is not None and not isinstance(exc, TensorSetTooLarge):
                self._log_refusal(context, first, refusal.code.name, refusal.message)
            if refusal is not None:
                self.note_refusal(client or "", refusal.code, refusal.message, refusal.reason)
                exc.counted = True  # type: ignore[union-attr,attr-defined]  (server/errors.py does not count it again)
            raise
        finally:
            self.coordinator.count_bytes(received=body.received.total, client=client)

    def _decode_commit(self, ticket: Any, payload: EncodedTensorSet) -> bool:
        """On a worker thread: decode the verified payload (finite values) and commit it."""
        return self.coordinator.commit(ticket, decode(payload))

    def _meta(self, header: pb.UpdateHeader, context: Context) -> UpdateMeta:
        client_id = self._client_id(context, header.client_id)
        if header.kind not in _KINDS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"update kind {header.kind} is not one of META_GRADIENT, PARAMETER_DELTA, EVALUATION",
                           Reason.WRONG_KIND)
        tensors = None
        if header.HasField("tensors"):
            tensors = header_from_proto(header.tensors)
        return UpdateMeta(
            run_id=header.run_id,
            round=header.round,
            client_id=client_id,
            base_version=header.base_version,
            kind=_KINDS[header.kind],
            weight=header.weight,
            metrics=dict(header.metrics),
            tensors=tensors,
            validation=header.validation,
        )

    @refusals
    async def Leave(self, request: pb.LeaveRequest, context: Context) -> pb.LeaveResponse:
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        self.coordinator.leave(client_id)
        return pb.LeaveResponse()

    @refusals
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context) -> pb.HeartbeatResponse:
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        return pb.HeartbeatResponse(still_needed=self.coordinator.heartbeat(client_id, int(request.round)))


class _StreamBody:
    """A SubmitUpdate stream after its header: chunks read once an upload slot is free, then the end."""

    def __init__(self, service: CoordinatorService, context: Context, timer: StreamTimer) -> None:
        self.service, self.context, self.timer = service, context, timer
        self.received = WireBytes()

    async def _read(self) -> Any:
        return await self.service.read(self.context, self.timer)

    async def first(self) -> pb.SubmitUpdateRequest:
        first = await self._read()
        if first is None or not first.HasField("header"):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message of SubmitUpdate must be the header",
                           Reason.BAD_STREAM)
        self.received.add(first)
        return first

    async def drain(self) -> None:
        while await self._read() is not None:
            pass

    async def no_payload(self) -> None:
        end = await self._read()
        if end is None or not end.HasField("end") or await self._read() is not None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "an evaluation update is a header and an end message, "
                           "with no chunks", Reason.BAD_STREAM)

    async def commit(self, ticket: Any) -> bool:
        coordinator = self.service.coordinator
        slot = coordinator.upload_slot()
        try:
            await asyncio.wait_for(slot.acquire(), timeout=coordinator.config.round_deadline_s)
        except TimeoutError:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many updates are streaming in; retry shortly",
                           Reason.BUSY) from None
        try:
            assert ticket.meta.tensors is not None
            payload = await collect_tensor_set(UPDATE, ticket.meta.tensors, self._read, count=self.received,
                                               max_bytes=coordinator.config.max_update_bytes)
            return await self.service.off_loop(self.service._decode_commit, ticket, payload)
        finally:
            payload = None  # free the buffer before another upload may take the slot
            slot.release()


class _InlineBody:
    """A SubmitInlineUpdate request: the header and the whole (small) payload, already received."""

    def __init__(self, service: CoordinatorService, request: pb.InlineUpdate) -> None:
        self.service, self.request = service, request
        self.received = WireBytes()
        self.received.total = int(request.ByteSize())

    async def first(self) -> pb.InlineUpdate:
        if not self.request.HasField("header"):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "SubmitInlineUpdate needs the update's header",
                           Reason.BAD_STREAM)
        if len(self.request.payload) > INLINE_UPDATE_MAX_BYTES:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"an inline update's payload is at most "
                           f"{INLINE_UPDATE_MAX_BYTES} bytes (this one: {len(self.request.payload)}); stream it with "
                           "SubmitUpdate", Reason.TOO_LARGE)
        return self.request

    async def drain(self) -> None:
        pass

    async def no_payload(self) -> None:
        if self.request.payload:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "an evaluation update carries no payload",
                           Reason.BAD_STREAM)

    async def commit(self, ticket: Any) -> bool:
        assert ticket.meta.tensors is not None
        payload = collect_inline_update(self.request, ticket.meta.tensors,
                                        max_bytes=self.service.coordinator.config.max_update_bytes)
        # On the loop: at most 64 KiB to check, decode and add (tens of microseconds), where the trip to a
        # worker thread and back cost more than the work: two thread wake-ups per update. 2,000 clients,
        # 1,000 a round (benchmarks/load_clients.py, alternated): coordinator CPU per round 2.19 and
        # 2.20 s with the trip, 1.50 and 1.67 s without.
        return self.service._decode_commit(ticket, payload)
