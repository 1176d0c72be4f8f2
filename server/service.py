"""The gRPC face of the coordinator: the Coordinator service's RPC handlers (server/grpc_server.py builds the server)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from collections.abc import Callable, Iterator

import grpc

from fedmeta.common import PROTOCOL_VERSION
from fedmeta.common.algorithms import UpdateKind
from fedmeta.common.codec import EncodedTensorSet, TensorSetError, TensorSetTooLarge
from fedmeta.common.config import check_client_id
from fedmeta.common.logformat import fields
from fedmeta.common.proto import pb, pb_grpc
from fedmeta.common.refusal import Reason
from fedmeta.common.textsafe import RateLimit, clip
from fedmeta.common.transfer import UPDATE, WireBytes, receive_tensor_set
from fedmeta.common.wire import header_from_proto, header_to_proto, run_config_to_proto
from fedmeta.server.auth import CLIENT_ID_KEY
from fedmeta.server.config import read_allowed_clients
from fedmeta.server.coordinator import Action, Coordinator, UpdateMeta
from fedmeta.server.errors import MAX_MESSAGE_CHARS, Rejected, refusal_of, refusals
from fedmeta.server.limits import Gate, JoinRateLimiter, KeyedGate, StreamWatchdog, peer_address

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


def certificate_names(context: grpc.ServicerContext) -> list[str]:
    """The CN and SANs of the peer's verified client certificate (empty without mutual TLS)."""
    auth = context.auth_context()
    raw = auth.get("x509_common_name", []) + auth.get("x509_subject_alternative_name", [])
    return [n.decode(errors="replace") for n in raw]


def _peer_client(first: pb.SubmitUpdateRequest | None) -> str:
    if first is None or not first.HasField("header"):
        return "an unknown client"
    return repr(clip(first.header.client_id, 64))


def _peer_host(context: grpc.ServicerContext) -> str:
    """The peer's address without its port ("ipv4:10.0.0.7"): one key per machine, not per connection."""
    peer = context.peer() or "unknown"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return clip(host, 80)


# Refusal lines per peer machine per minute; past it one line says so and the next minute counts them.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW_S = 60.0


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Translates RPCs into Coordinator calls; @refusals turns Rejected into status codes and reasons."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.run = coordinator.run
        config = coordinator.config
        self.require_client_cert = config.require_client_cert
        self.tokens = config.tokens_file is not None
        self.admin_name = config.admin_cert_name
        self._refusals = RateLimit(burst=REFUSAL_LOG_BURST, window_s=REFUSAL_LOG_WINDOW_S)
        self.allowed = read_allowed_clients(Path(config.allowed_clients)) if config.allowed_clients else None
        # Thread budget (--max-workers W): long-polls W/2, streams W/4, the rest for short calls.
        self.polls = Gate(max(1, config.max_workers // 2))
        self.streams = Gate(max(1, config.max_workers // 4))
        self.uploading = KeyedGate()
        self.watchdog = StreamWatchdog(config.stream_idle_s)
        self.joins = JoinRateLimiter(config.joins_per_s)

    def note_refusal(self, client_id: str, code: grpc.StatusCode, message: str, reason: Reason | None) -> None:
        """Counted for the status snapshot (server/clientstats.py), per reason and per joined client."""
        self.coordinator.stats.refused(client_id, reason.value if reason is not None else code.name, message)

    def _log_refusal(self, context: grpc.ServicerContext, first: pb.SubmitUpdateRequest | None, code: str,
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

    def _client_id(self, context: grpc.ServicerContext, client_id: str) -> str:
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
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
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
        response = pb.JoinResponse(config=run_config_to_proto(config))
        self.coordinator.count_bytes(sent=response.ByteSize(), received=request.ByteSize(), client=client_id)
        return response

    @refusals
    def WaitForAssignment(
        self, request: pb.WaitForAssignmentRequest, context: grpc.ServicerContext
    ) -> pb.WaitForAssignmentResponse:
        client_id = self._client_id(context, request.client_id)
        timeout = self.run.poll_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 0.5))
        # Over the long-poll budget the call becomes a short poll: it answers at once (work if
        # there is some, else WAIT) and the client pauses before asking again (client/worker.py).
        held = self.polls.try_enter()
        try:
            self.coordinator.check_run(request.run_id)
            a = self.coordinator.wait(client_id, timeout if held else 0.0, context.is_active)
        finally:
            if held:
                self.polls.leave()
        response = pb.WaitForAssignmentResponse(
            action=_ACTIONS[a.action], round=a.round, parameter_version=a.version, detail=a.detail,
            validation=a.validation,
        )
        if a.action in (Action.TRAIN, Action.EVALUATE) and request.held_version != a.version:
            inline = self.coordinator.inline_parameters(a.version)
            if inline is not None:
                response.parameters.tensors.CopyFrom(header_to_proto(inline[0]))
                response.parameters.payload = inline[1]
        self.coordinator.count_bytes(sent=response.ByteSize(), received=request.ByteSize(), client=client_id)
        return response

    @refusals
    def FetchParameters(
        self, request: pb.FetchParametersRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchParametersResponse]:
        if not self.streams.try_enter():
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly", Reason.BUSY)
        try:
            with self.watchdog.watch(context) as w:
                yield from self.watchdog.responses(w, self._fetch(request, context))
        finally:
            self.streams.leave()

    def _fetch(
        self, request: pb.FetchParametersRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchParametersResponse]:
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        # Each sending stream holds about three copies of a chunk (the message, its serialised
        # bytes, gRPC's buffer) until the peer's window takes it: a bounded number send at once,
        # so memory stays O(model + slots x chunk) however many clients fetch together.
        slot = self.coordinator.download_slot()
        if not slot.acquire(timeout=self.coordinator.config.round_deadline_s):
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many parameter streams are sending; retry shortly",
                           Reason.BUSY)
        try:
            encoded: EncodedTensorSet = self.coordinator.acquire_parameters(client_id, request.parameter_version)
            sent = 0
            try:
                # serialised once per version and sent as they are (server/grpc_server.py registers
                # FetchParameters with a serialiser that passes bytes through)
                for data, counted in self.coordinator.parameter_wire(request.parameter_version, encoded):
                    sent += counted
                    yield data  # type: ignore[misc]
            finally:
                self.coordinator.release_parameters()
                self.coordinator.count_bytes(sent=sent, received=request.ByteSize(), client=client_id)
        finally:
            slot.release()

    @refusals
    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        """Bounded per call: a stream slot (--max-workers / 4), one upload per client id, and
        --stream-idle-s between messages (the watchdog cancels a stream that stalls)."""
        try:
            return self._submit_bounded(request_iterator, context)
        except (Rejected, TensorSetError) as exc:
            refusal = refusal_of(exc)
            self.coordinator.telemetry.update_refused(refusal.reason if refusal is not None else None)
            raise

    def _submit_bounded(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        if not self.streams.try_enter():
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many streams are open; retry shortly", Reason.BUSY)
        claimed: list[str] = []
        try:
            with self.watchdog.watch(context) as w:
                requests = self.watchdog.requests(w, request_iterator)
                try:
                    return self._submit(requests, context, lambda cid: self._claim(cid, claimed))
                except grpc.RpcError:
                    if w.cancelled:
                        log.info("update stream from %s cancelled: no message for %g s (--stream-idle-s)",
                                 context.peer(), self.watchdog.idle_s)
                    raise
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

    def _submit(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext,
        claim: Callable[[str], None],
    ) -> pb.SubmitUpdateResponse:
        """The header is admitted (server/admission.py) before any chunk is read; the tensors are
        committed (bounds, norm filter, counted once) after the end message."""
        received = WireBytes()
        first = None
        client = None
        stream_error = grpc.StatusCode.INVALID_ARGUMENT
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise Rejected(stream_error, "the first message of SubmitUpdate must be the header", Reason.BAD_STREAM)
            received.add(first)
            meta = self._meta(first.header, context)
            client = meta.client_id  # checked against its token or certificate: refusals count against it
            ticket = self.coordinator.admit(meta)
            claim(ticket.meta.client_id)  # after the header checks: only a sampled client's id is held
            if ticket.duplicate:
                self._drain(request_iterator)
                return pb.SubmitUpdateResponse(accepted=True, duplicate=True)
            if not ticket.carries_tensors:
                messages = list(itertools.islice(request_iterator, 2))
                if len(messages) != 1 or not messages[0].HasField("end"):
                    raise Rejected(stream_error, "an evaluation update is a header and an end message, with no "
                                   "chunks", Reason.BAD_STREAM)
                duplicate = self.coordinator.commit(ticket, None)
                return pb.SubmitUpdateResponse(accepted=True, duplicate=duplicate)
            slot = self.coordinator.upload_slot()
            if not slot.acquire(timeout=self.coordinator.config.round_deadline_s):
                raise Rejected(grpc.StatusCode.UNAVAILABLE, "too many updates are streaming in; retry shortly",
                               Reason.BUSY)
            tensors = None
            try:
                assert ticket.meta.tensors is not None
                tensors = receive_tensor_set(UPDATE, ticket.meta.tensors, request_iterator, count=received,
                                             max_bytes=self.coordinator.config.max_update_bytes)
                duplicate = self.coordinator.commit(ticket, tensors)
            finally:
                tensors = None  # free the buffer before another upload may take the slot
                slot.release()
            return pb.SubmitUpdateResponse(accepted=True, duplicate=duplicate)
        except (Rejected, TensorSetError) as exc:
            refusal = refusal_of(exc)
            if refusal is not None and not isinstance(exc, TensorSetTooLarge):
                self._log_refusal(context, first, refusal.code.name, refusal.message)
            if refusal is not None:
                self.note_refusal(client or "", refusal.code, refusal.message, refusal.reason)
            raise
        finally:
            self.coordinator.count_bytes(received=received.total, client=client)

    def _meta(self, header: pb.UpdateHeader, context: grpc.ServicerContext) -> UpdateMeta:
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

    @staticmethod
    def _drain(request_iterator: Iterator[pb.SubmitUpdateRequest]) -> None:
        for _ in request_iterator:
            pass

    @refusals
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        self.coordinator.leave(client_id)
        return pb.LeaveResponse()

    @refusals
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        client_id = self._client_id(context, request.client_id)
        self.coordinator.check_run(request.run_id)
        return pb.HeartbeatResponse(still_needed=self.coordinator.heartbeat(client_id, int(request.round)))
