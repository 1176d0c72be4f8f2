"""Conversions between domain types and protobuf messages, as x_to_proto / x_from_proto pairs.

Every use of generated protobuf code for tensor sets (headers, encodings, chunks) is here;
common/codec.py stays pure (tensors <-> bytes).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from fedmeta.common.codec import (ENCODINGS, MAX_TENSORS, TensorSetError, TensorSetHeader, TensorSetTooLarge, TensorSpec,
                          check_name)
from fedmeta.common.config import RunConfig
from fedmeta.common.models import ModelSpec
from fedmeta.common.proto import pb, tensor_pb


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(name=spec.name, kwargs_json=json.dumps(spec.kwargs, sort_keys=True))


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    kwargs = json.loads(msg.kwargs_json or "{}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"model kwargs: expected a JSON object, got {msg.kwargs_json!r}")
    return ModelSpec(msg.name, kwargs)


# RunConfig <-> pb.RunConfig, generic over the fields: a field is the proto field of its name
# (tests/unit/test_settings.py checks that each exists with a compatible type); a message field is
# a ModelSpec, an enum field a transport encoding, every other field is copied as it is.


def _proto_kind(name: str) -> str:
    f = pb.RunConfig.DESCRIPTOR.fields_by_name[name]
    return "message" if f.message_type is not None else "enum" if f.enum_type is not None else "plain"


def run_config_to_proto(config: RunConfig) -> pb.RunConfig:
    out: dict[str, Any] = {}
    for f in fields(config):
        value, kind = getattr(config, f.name), _proto_kind(f.name)
        out[f.name] = model_spec_to_proto(value) if kind == "message" else (
            encoding_to_proto(value) if kind == "enum" else value)
    return pb.RunConfig(**out)


# Settings whose proto3 zero value is not a valid value: an older coordinator never sent them.
_UNSET_IS_DEFAULT = frozenset({"schedule", "buffer_size"})


def run_config_from_proto(msg: pb.RunConfig) -> RunConfig:
    out: dict[str, Any] = {}
    for f in fields(RunConfig):
        value, kind = getattr(msg, f.name), _proto_kind(f.name)
        if kind == "message":
            value = model_spec_from_proto(value)
        elif kind == "enum":
            value = encoding_from_proto(value)
        elif f.default is None and not value:
            value = None  # proto3 has no presence: 0 (an older coordinator) is unset, as eval_ways's None (= ways)
        elif f.name in _UNSET_IS_DEFAULT and not value:
            value = f.default  # "" or 0 from a coordinator older than the setting: its default (sync rounds)
        out[f.name] = value
    return RunConfig(**out)


# ---- tensor sets (protos/fedmeta/v1/tensor.proto) ------------------------------------------------
_DTYPE_TO_PROTO: dict[str, int] = {
    "float32": tensor_pb.DTYPE_FLOAT32,
    "float16": tensor_pb.DTYPE_FLOAT16,
    "bfloat16": tensor_pb.DTYPE_BFLOAT16,
    "float64": tensor_pb.DTYPE_FLOAT64,
    "int64": tensor_pb.DTYPE_INT64,
    "int32": tensor_pb.DTYPE_INT32,
    "uint8": tensor_pb.DTYPE_UINT8,
}
_DTYPE_FROM_PROTO: dict[int, str] = {v: k for k, v in _DTYPE_TO_PROTO.items()}
_ENCODING_TO_PROTO: dict[str, int] = {
    "float32": tensor_pb.ENCODING_FLOAT32,
    "float16": tensor_pb.ENCODING_FLOAT16,
    "bfloat16": tensor_pb.ENCODING_BFLOAT16,
}
_ENCODING_FROM_PROTO: dict[int, str] = {v: k for k, v in _ENCODING_TO_PROTO.items()}


def encoding_to_proto(encoding: str) -> int:
    return _ENCODING_TO_PROTO[encoding]


def encoding_from_proto(value: int) -> str:
    if value not in _ENCODING_FROM_PROTO:
        raise TensorSetError(f"unknown tensor encoding {value}: expected one of {ENCODINGS}")
    return _ENCODING_FROM_PROTO[value]


def header_to_proto(header: TensorSetHeader) -> tensor_pb.TensorSetHeader:
    return tensor_pb.TensorSetHeader(
        tensors=[
            tensor_pb.TensorSpec(name=s.name, dtype=_DTYPE_TO_PROTO[s.dtype], shape=s.shape)  # type: ignore[arg-type]
            for s in header.specs
        ],
        total_bytes=header.total_bytes,
        sha256=header.sha256,
        encoding=_ENCODING_TO_PROTO[header.encoding],  # type: ignore[arg-type]
    )


def header_from_proto(msg: tensor_pb.TensorSetHeader) -> TensorSetHeader:
    """Validate a wire header: known dtypes, sane shapes, unique names, consistent size."""
    if len(msg.tensors) > MAX_TENSORS:
        raise TensorSetTooLarge(f"header lists {len(msg.tensors)} tensors; at most {MAX_TENSORS} are allowed")
    encoding = _ENCODING_FROM_PROTO.get(msg.encoding)
    if encoding is None:
        raise TensorSetError(f"unknown tensor encoding {msg.encoding}: expected one of {ENCODINGS}")
    specs = []
    seen = set()
    for t in msg.tensors:
        check_name(t.name)
        if t.name in seen:
            raise TensorSetError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
        dtype = _DTYPE_FROM_PROTO.get(t.dtype)
        if dtype is None:
            raise TensorSetError(f"tensor {t.name!r}: unknown dtype {t.dtype}")
        if len(t.shape) > 16 or any(d < 0 for d in t.shape):
            raise TensorSetError(f"tensor {t.name!r}: invalid shape {list(t.shape)}")
        specs.append(TensorSpec(t.name, dtype, tuple(t.shape)))
    total = sum(s.nbytes for s in specs)
    if total != msg.total_bytes:
        raise TensorSetError(f"header declares {msg.total_bytes} bytes but its tensors need {total}")
    if len(msg.sha256) != 32:
        raise TensorSetError(f"sha256 must be 32 bytes, got {len(msg.sha256)}")
    return TensorSetHeader(tuple(specs), total, bytes(msg.sha256), encoding)


def chunk_to_proto(offset: int, data: bytes) -> tensor_pb.TensorChunk:
    return tensor_pb.TensorChunk(offset=offset, data=data)


def chunk_from_proto(msg: tensor_pb.TensorChunk) -> tuple[int, bytes]:
    """(offset, data) of a payload chunk; the Reassembler checks both."""
    return msg.offset, msg.data
