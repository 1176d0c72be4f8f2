from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ("client_offset", "client_limit")
    CLIENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    client_offset: int
    client_limit: int
    def __init__(self, client_offset: _Optional[int] = ..., client_limit: _Optional[int] = ...) -> None: ...

class RefusalCount(_message.Message):
    __slots__ = ("reason", "count", "last_message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    last_message: str
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ..., last_message: _Optional[str] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "algorithm", "task", "rounds_done", "rounds_total", "phase", "rounds_per_minute", "eta_s", "paused", "stop_requested", "round_deadline_s", "min_clients", "clients_per_round", "clients_live", "clients_registered", "clients_revoked", "open_round", "open_sampled", "open_answered", "open_round_age_s", "parameter_version", "wall_s", "bytes_sent", "bytes_received")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    STOP_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_LIVE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_REVOKED_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    OPEN_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    OPEN_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_AGE_S_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_VERSION_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm: str
    task: str
    rounds_done: int
    rounds_total: int
    phase: str
    rounds_per_minute: float
    eta_s: float
    paused: bool
    stop_requested: bool
    round_deadline_s: float
    min_clients: int
    clients_per_round: int
    clients_live: int
    clients_registered: int
    clients_revoked: int
    open_round: int
    open_sampled: int
    open_answered: int
    open_round_age_s: float
    parameter_version: str
    wall_s: float
    bytes_sent: int
    bytes_received: int
    def __init__(self, run_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., task: _Optional[str] = ..., rounds_done: _Optional[int] = ..., rounds_total: _Optional[int] = ..., phase: _Optional[str] = ..., rounds_per_minute: _Optional[float] = ..., eta_s: _Optional[float] = ..., paused: _Optional[bool] = ..., stop_requested: _Optional[bool] = ..., round_deadline_s: _Optional[float] = ..., min_clients: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., clients_live: _Optional[int] = ..., clients_registered: _Optional[int] = ..., clients_revoked: _Optional[int] = ..., open_round: _Optional[int] = ..., open_sampled: _Optional[int] = ..., open_answered: _Optional[int] = ..., open_round_age_s: _Optional[float] = ..., parameter_version: _Optional[str] = ..., wall_s: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "state", "last_seen_s", "rounds_trained", "compute_s", "bytes_sent", "bytes_received", "device", "refusals")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    state: str
    last_seen_s: float
    rounds_trained: int
    compute_s: float
    bytes_sent: int
    bytes_received: int
    device: str
    refusals: _containers.RepeatedCompositeFieldContainer[RefusalCount]
    def __init__(self, client_id: _Optional[str] = ..., state: _Optional[str] = ..., last_seen_s: _Optional[float] = ..., rounds_trained: _Optional[int] = ..., compute_s: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., device: _Optional[str] = ..., refusals: _Optional[_Iterable[_Union[RefusalCount, _Mapping]]] = ...) -> None: ...

class RoundPoint(_message.Message):
    __slots__ = ("round", "meta_loss", "clients_answered", "round_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    META_LOSS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    ROUND_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    meta_loss: float
    clients_answered: int
    round_s: float
    def __init__(self, round: _Optional[int] = ..., meta_loss: _Optional[float] = ..., clients_answered: _Optional[int] = ..., round_s: _Optional[float] = ...) -> None: ...

class ValidationPoint(_message.Message):
    __slots__ = ("rounds_trained", "metric", "value", "best")
    ROUNDS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    rounds_trained: int
    metric: str
    value: float
    best: bool
    def __init__(self, rounds_trained: _Optional[int] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., best: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("run", "clients", "clients_total", "rounds", "validations", "last_metrics", "refusals", "adaptation_curve", "adaptation_metric", "eval_before", "eval_after")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_CURVE_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_METRIC_FIELD_NUMBER: _ClassVar[int]
    EVAL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVAL_AFTER_FIELD_NUMBER: _ClassVar[int]
    run: RunStatus
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    clients_total: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundPoint]
    validations: _containers.RepeatedCompositeFieldContainer[ValidationPoint]
    last_metrics: _containers.ScalarMap[str, float]
    refusals: _containers.RepeatedCompositeFieldContainer[RefusalCount]
    adaptation_curve: _containers.RepeatedScalarFieldContainer[float]
    adaptation_metric: str
    eval_before: float
    eval_after: float
    def __init__(self, run: _Optional[_Union[RunStatus, _Mapping]] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., clients_total: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundPoint, _Mapping]]] = ..., validations: _Optional[_Iterable[_Union[ValidationPoint, _Mapping]]] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., refusals: _Optional[_Iterable[_Union[RefusalCount, _Mapping]]] = ..., adaptation_curve: _Optional[_Iterable[float]] = ..., adaptation_metric: _Optional[str] = ..., eval_before: _Optional[float] = ..., eval_after: _Optional[float] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...

class RevokeClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class RevokeClientResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...

class SetRoundDeadlineRequest(_message.Message):
    __slots__ = ("round_deadline_s",)
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    round_deadline_s: float
    def __init__(self, round_deadline_s: _Optional[float] = ...) -> None: ...

class SetRoundDeadlineResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...

class SetQuorumRequest(_message.Message):
    __slots__ = ("min_clients",)
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    min_clients: int
    def __init__(self, min_clients: _Optional[int] = ...) -> None: ...

class SetQuorumResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...

class StopAfterRoundRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopAfterRoundResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...
