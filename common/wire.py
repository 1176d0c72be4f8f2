"""Conversions between domain types and protobuf messages, as x_to_proto / x_from_proto pairs."""

from __future__ import annotations

import json

from common.codec import encoding_from_proto, encoding_to_proto
from common.config import RunConfig
from common.models import ModelSpec
from common.proto import pb


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(name=spec.name, kwargs_json=json.dumps(spec.kwargs, sort_keys=True))


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    kwargs = json.loads(msg.kwargs_json or "{}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"model kwargs: expected a JSON object, got {msg.kwargs_json!r}")
    return ModelSpec(msg.name, kwargs)


def run_config_to_proto(config: RunConfig) -> pb.RunConfig:
    return pb.RunConfig(
        run_id=config.run_id,
        algorithm=config.algorithm,
        task=config.task,
        model=model_spec_to_proto(config.model),
        shots=config.shots,
        queries=config.queries,
        tasks_per_client=config.tasks_per_client,
        inner_steps=config.inner_steps,
        inner_lr=config.inner_lr,
        seed=config.seed,
        encoding=encoding_to_proto(config.encoding),
        chunk_bytes=config.chunk_bytes,
        eval_shots=config.eval_shots,
        eval_steps=config.eval_steps,
        eval_tasks_per_client=config.eval_tasks_per_client,
        poll_timeout_s=config.poll_timeout_s,
        rounds=config.rounds,
        eval_queries=config.eval_queries,
    )


def run_config_from_proto(msg: pb.RunConfig) -> RunConfig:
    return RunConfig(
        run_id=msg.run_id,
        algorithm=msg.algorithm,
        task=msg.task,
        model=model_spec_from_proto(msg.model),
        shots=msg.shots,
        queries=msg.queries,
        tasks_per_client=msg.tasks_per_client,
        inner_steps=msg.inner_steps,
        inner_lr=msg.inner_lr,
        seed=msg.seed,
        encoding=encoding_from_proto(msg.encoding),
        chunk_bytes=msg.chunk_bytes,
        eval_shots=msg.eval_shots,
        eval_steps=msg.eval_steps,
        eval_tasks_per_client=msg.eval_tasks_per_client,
        poll_timeout_s=msg.poll_timeout_s,
        rounds=msg.rounds,
        eval_queries=msg.eval_queries,
    )
