"""The Admin service's RPC handlers: status and the operator's actions (server/steering.py).

Every call is checked against the admin credential first (server/admin_auth.py); a
federation client's token, no token or a wrong one is refused before anything is read.
A value the action refuses (a malformed client id, a deadline out of range) is
INVALID_ARGUMENT with the flag's own message, and is recorded in admin.jsonl too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from fedmeta.common.proto import admin_pb, admin_pb_grpc
from fedmeta.common.textsafe import clip
from fedmeta.server.admin_auth import AdminCredential
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.status import snapshot

log = logging.getLogger("fedmeta.admin")
ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminService(admin_pb_grpc.AdminServicer):
    def __init__(self, coordinator: Coordinator, credential: AdminCredential) -> None:
        self.coordinator = coordinator
        self.credential = credential

    def _act(self, context: grpc.ServicerContext, action: str, arguments: dict[str, Any],
             run: Callable[[], str]) -> str:
        self.credential.check(context)
        try:
            return run()
        except ValueError as exc:
            message = clip(exc, 500)
            self.coordinator.steering.refused(action, arguments, message)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            raise AssertionError("unreachable") from None

    def GetStatus(self, request: admin_pb.GetStatusRequest, context: grpc.ServicerContext) -> admin_pb.GetStatusResponse:
        self.credential.check(context)
        return snapshot(self.coordinator, offset=request.client_offset, limit=request.client_limit)

    def Pause(self, request: admin_pb.PauseRequest, context: grpc.ServicerContext) -> admin_pb.PauseResponse:
        return admin_pb.PauseResponse(result=self._act(context, "pause", {}, self.coordinator.steering.pause))

    def Resume(self, request: admin_pb.ResumeRequest, context: grpc.ServicerContext) -> admin_pb.ResumeResponse:
        return admin_pb.ResumeResponse(result=self._act(context, "resume", {}, self.coordinator.steering.resume))

    def RevokeClient(self, request: admin_pb.RevokeClientRequest,
                     context: grpc.ServicerContext) -> admin_pb.RevokeClientResponse:
        cid = request.client_id
        result = self._act(context, "revoke", {"client_id": clip(cid, 80)},
                           lambda: self.coordinator.steering.revoke(cid))
        return admin_pb.RevokeClientResponse(result=result)

    def SetRoundDeadline(self, request: admin_pb.SetRoundDeadlineRequest,
                         context: grpc.ServicerContext) -> admin_pb.SetRoundDeadlineResponse:
        value = request.round_deadline_s
        result = self._act(context, "set-deadline", {"round_deadline_s": value},
                           lambda: self.coordinator.steering.set_deadline(value))
        return admin_pb.SetRoundDeadlineResponse(result=result)

    def SetQuorum(self, request: admin_pb.SetQuorumRequest, context: grpc.ServicerContext) -> admin_pb.SetQuorumResponse:
        value = request.min_clients
        result = self._act(context, "set-quorum", {"min_clients": value},
                           lambda: self.coordinator.steering.set_quorum(value))
        return admin_pb.SetQuorumResponse(result=result)

    def StopAfterRound(self, request: admin_pb.StopAfterRoundRequest,
                       context: grpc.ServicerContext) -> admin_pb.StopAfterRoundResponse:
        return admin_pb.StopAfterRoundResponse(
            result=self._act(context, "stop", {}, self.coordinator.steering.stop_after_round))
