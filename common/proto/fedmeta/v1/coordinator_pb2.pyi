from fedmeta.common.proto.fedmeta.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_TRAIN: _ClassVar[Action]
    ACTION_EVALUATE: _ClassVar[Action]
    ACTION_WAIT: _ClassVar[Action]
    ACTION_FINISHED: _ClassVar[Action]

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    UPDATE_KIND_META_GRADIENT: _ClassVar[UpdateKind]
    UPDATE_KIND_PARAMETER_DELTA: _ClassVar[UpdateKind]
    UPDATE_KIND_EVALUATION: _ClassVar[UpdateKind]

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_JOINED: _ClassVar[RefusalReason]
    REFUSAL_REASON_WRONG_RUN: _ClassVar[RefusalReason]
    REFUSAL_REASON_ROUND_CLOSED: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_SAMPLED: _ClassVar[RefusalReason]
    REFUSAL_REASON_STALE_VERSION: _ClassVar[RefusalReason]
    REFUSAL_REASON_WRONG_KIND: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_WEIGHT: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_METRICS: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_TENSORS: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_VALUES: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_STREAM: _ClassVar[RefusalReason]
    REFUSAL_REASON_TOO_LARGE: _ClassVar[RefusalReason]
    REFUSAL_REASON_BUSY: _ClassVar[RefusalReason]
    REFUSAL_REASON_REGISTRY_FULL: _ClassVar[RefusalReason]
    REFUSAL_REASON_STOPPING: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_CLIENT_ID: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_ALLOWED: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_PROTOCOL: _ClassVar[RefusalReason]
ACTION_UNSPECIFIED: Action
ACTION_TRAIN: Action
ACTION_EVALUATE: Action
ACTION_WAIT: Action
ACTION_FINISHED: Action
UPDATE_KIND_UNSPECIFIED: UpdateKind
UPDATE_KIND_META_GRADIENT: UpdateKind
UPDATE_KIND_PARAMETER_DELTA: UpdateKind
UPDATE_KIND_EVALUATION: UpdateKind
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_NOT_JOINED: RefusalReason
REFUSAL_REASON_WRONG_RUN: RefusalReason
REFUSAL_REASON_ROUND_CLOSED: RefusalReason
REFUSAL_REASON_NOT_SAMPLED: RefusalReason
REFUSAL_REASON_STALE_VERSION: RefusalReason
REFUSAL_REASON_WRONG_KIND: RefusalReason
REFUSAL_REASON_BAD_WEIGHT: RefusalReason
REFUSAL_REASON_BAD_METRICS: RefusalReason
REFUSAL_REASON_BAD_TENSORS: RefusalReason
REFUSAL_REASON_BAD_VALUES: RefusalReason
REFUSAL_REASON_BAD_STREAM: RefusalReason
REFUSAL_REASON_TOO_LARGE: RefusalReason
REFUSAL_REASON_BUSY: RefusalReason
REFUSAL_REASON_REGISTRY_FULL: RefusalReason
REFUSAL_REASON_STOPPING: RefusalReason
REFUSAL_REASON_BAD_CLIENT_ID: RefusalReason
REFUSAL_REASON_NOT_ALLOWED: RefusalReason
REFUSAL_REASON_BAD_PROTOCOL: RefusalReason

class ModelSpec(_message.Message):
    __slots__ = ("name", "kwargs_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs_json: str
    def __init__(self, name: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("run_id", "algorithm", "task", "model", "shots", "queries", "tasks_per_client", "inner_steps", "inner_lr", "seed", "encoding", "chunk_bytes", "eval_shots", "eval_steps", "eval_tasks_per_client", "poll_timeout_s", "rounds", "eval_queries", "ways", "dim", "partition", "shards", "rotations", "first_order_rounds", "msl", "lslr", "cosine_outer", "local_steps", "local_lr", "perfedavg_variant", "curvature_bias", "curvature_first_order", "eval_every", "val_tasks_per_client", "eval_ways", "eval_curve_tasks", "clusters", "matching_fce", "matching_steps", "relation_loss", "relation_pool", "relation_hidden", "relation_norm", "schedule", "buffer_size", "staleness_exponent", "max_staleness")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TASKS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    INNER_LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVAL_SHOTS_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_TASKS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    POLL_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_QUERIES_FIELD_NUMBER: _ClassVar[int]
    WAYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROTATIONS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ORDER_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MSL_FIELD_NUMBER: _ClassVar[int]
    LSLR_FIELD_NUMBER: _ClassVar[int]
    COSINE_OUTER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LR_FIELD_NUMBER: _ClassVar[int]
    PERFEDAVG_VARIANT_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_BIAS_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIRST_ORDER_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    VAL_TASKS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    EVAL_WAYS_FIELD_NUMBER: _ClassVar[int]
    EVAL_CURVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    MATCHING_FCE_FIELD_NUMBER: _ClassVar[int]
    MATCHING_STEPS_FIELD_NUMBER: _ClassVar[int]
    RELATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    RELATION_POOL_FIELD_NUMBER: _ClassVar[int]
    RELATION_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RELATION_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm: str
    task: str
    model: ModelSpec
    shots: int
    queries: int
    tasks_per_client: int
    inner_steps: int
    inner_lr: float
    seed: int
    encoding: _tensor_pb2.Encoding
    chunk_bytes: int
    eval_shots: int
    eval_steps: int
    eval_tasks_per_client: int
    poll_timeout_s: float
    rounds: int
    eval_queries: int
    ways: int
    dim: int
    partition: str
    shards: int
    rotations: bool
    first_order_rounds: int
    msl: bool
    lslr: bool
    cosine_outer: bool
    local_steps: int
    local_lr: float
    perfedavg_variant: str
    curvature_bias: str
    curvature_first_order: bool
    eval_every: int
    val_tasks_per_client: int
    eval_ways: int
    eval_curve_tasks: int
    clusters: int
    matching_fce: bool
    matching_steps: int
    relation_loss: str
    relation_pool: str
    relation_hidden: int
    relation_norm: bool
    schedule: str
    buffer_size: int
    staleness_exponent: float
    max_staleness: int
    def __init__(self, run_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., task: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., shots: _Optional[int] = ..., queries: _Optional[int] = ..., tasks_per_client: _Optional[int] = ..., inner_steps: _Optional[int] = ..., inner_lr: _Optional[float] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[_tensor_pb2.Encoding, str]] = ..., chunk_bytes: _Optional[int] = ..., eval_shots: _Optional[int] = ..., eval_steps: _Optional[int] = ..., eval_tasks_per_client: _Optional[int] = ..., poll_timeout_s: _Optional[float] = ..., rounds: _Optional[int] = ..., eval_queries: _Optional[int] = ..., ways: _Optional[int] = ..., dim: _Optional[int] = ..., partition: _Optional[str] = ..., shards: _Optional[int] = ..., rotations: _Optional[bool] = ..., first_order_rounds: _Optional[int] = ..., msl: _Optional[bool] = ..., lslr: _Optional[bool] = ..., cosine_outer: _Optional[bool] = ..., local_steps: _Optional[int] = ..., local_lr: _Optional[float] = ..., perfedavg_variant: _Optional[str] = ..., curvature_bias: _Optional[str] = ..., curvature_first_order: _Optional[bool] = ..., eval_every: _Optional[int] = ..., val_tasks_per_client: _Optional[int] = ..., eval_ways: _Optional[int] = ..., eval_curve_tasks: _Optional[int] = ..., clusters: _Optional[int] = ..., matching_fce: _Optional[bool] = ..., matching_steps: _Optional[int] = ..., relation_loss: _Optional[str] = ..., relation_pool: _Optional[str] = ..., relation_hidden: _Optional[int] = ..., relation_norm: _Optional[bool] = ..., schedule: _Optional[str] = ..., buffer_size: _Optional[int] = ..., staleness_exponent: _Optional[float] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "protocol_version", "device", "num_tasks", "encodings")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_TASKS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    protocol_version: int
    device: str
    num_tasks: int
    encodings: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Encoding]
    def __init__(self, client_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., device: _Optional[str] = ..., num_tasks: _Optional[int] = ..., encodings: _Optional[_Iterable[_Union[_tensor_pb2.Encoding, str]]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("config", "poll_takes_update")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    POLL_TAKES_UPDATE_FIELD_NUMBER: _ClassVar[int]
    config: RunConfig
    poll_takes_update: bool
    def __init__(self, config: _Optional[_Union[RunConfig, _Mapping]] = ..., poll_takes_update: _Optional[bool] = ...) -> None: ...

class WaitForAssignmentRequest(_message.Message):
    __slots__ = ("run_id", "client_id", "held_version", "update")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    held_version: str
    update: InlineUpdate
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., held_version: _Optional[str] = ..., update: _Optional[_Union[InlineUpdate, _Mapping]] = ...) -> None: ...

class WaitForAssignmentResponse(_message.Message):
    __slots__ = ("action", "round", "parameter_version", "detail", "parameters", "validation", "update")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    action: Action
    round: int
    parameter_version: str
    detail: str
    parameters: InlineParameters
    validation: bool
    update: SubmitUpdateResponse
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., round: _Optional[int] = ..., parameter_version: _Optional[str] = ..., detail: _Optional[str] = ..., parameters: _Optional[_Union[InlineParameters, _Mapping]] = ..., validation: _Optional[bool] = ..., update: _Optional[_Union[SubmitUpdateResponse, _Mapping]] = ...) -> None: ...

class InlineParameters(_message.Message):
    __slots__ = ("tensors", "payload")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    tensors: _tensor_pb2.TensorSetHeader
    payload: bytes
    def __init__(self, tensors: _Optional[_Union[_tensor_pb2.TensorSetHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class FetchParametersRequest(_message.Message):
    __slots__ = ("run_id", "client_id", "parameter_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    parameter_version: str
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., parameter_version: _Optional[str] = ...) -> None: ...

class FetchParametersResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ParametersHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[ParametersHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class ParametersHeader(_message.Message):
    __slots__ = ("parameter_version", "tensors")
    PARAMETER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    parameter_version: str
    tensors: _tensor_pb2.TensorSetHeader
    def __init__(self, parameter_version: _Optional[str] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorSetHeader, _Mapping]] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: _tensor_pb2.TensorChunk
    end: UpdateEnd
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., end: _Optional[_Union[UpdateEnd, _Mapping]] = ...) -> None: ...

class UpdateEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InlineUpdate(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round", "client_id", "base_version", "kind", "weight", "metrics", "tensors", "validation")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    client_id: str
    base_version: str
    kind: UpdateKind
    weight: float
    metrics: _containers.ScalarMap[str, float]
    tensors: _tensor_pb2.TensorSetHeader
    validation: bool
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., base_version: _Optional[str] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., weight: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorSetHeader, _Mapping]] = ..., validation: _Optional[bool] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "client_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "client_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("still_needed",)
    STILL_NEEDED_FIELD_NUMBER: _ClassVar[int]
    still_needed: bool
    def __init__(self, still_needed: _Optional[bool] = ...) -> None: ...
