"""Conversions between domain types and protobuf messages, as x_to_proto / x_from_proto pairs."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from common.codec import encoding_from_proto, encoding_to_proto
from common.config import RunConfig
from common.models import ModelSpec
from common.proto import pb

# RunConfig fields that need a conversion; every other field is copied as it is.
_CONVERTED = ("model", "encoding")


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(name=spec.name, kwargs_json=json.dumps(spec.kwargs, sort_keys=True))


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    kwargs = json.loads(msg.kwargs_json or "{}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"model kwargs: expected a JSON object, got {msg.kwargs_json!r}")
    return ModelSpec(msg.name, kwargs)


def run_config_to_proto(config: RunConfig) -> pb.RunConfig:
    plain: dict[str, Any] = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _CONVERTED}
    return pb.RunConfig(
        **plain,
        model=model_spec_to_proto(config.model),
        encoding=encoding_to_proto(config.encoding),  # type: ignore[arg-type]
    )


def run_config_from_proto(msg: pb.RunConfig) -> RunConfig:
    plain = {f.name: getattr(msg, f.name) for f in fields(RunConfig) if f.name not in _CONVERTED}
    plain["eval_ways"] = plain["eval_ways"] or None  # 0: unset (an older coordinator), the same as ways
    return RunConfig(**plain, model=model_spec_from_proto(msg.model), encoding=encoding_from_proto(msg.encoding))
