"""The trust boundary with real processes: a hostile coordinator cannot choose code on a client,
and a coordinator started with --no-reflection tells callers nothing but its health.

The fake coordinator is a real gRPC server in this process that answers Join with a run
configuration naming `subprocess:run` and shell arguments; the real `python -m fedmeta.client`
joins it and must refuse with one line, exit non-zero and run nothing.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedmeta.common.algorithms import meta_parameters
from fedmeta.common.config import RunConfig
from fedmeta.common.codec import encode
from fedmeta.common.proto import pb, pb_grpc, tensor_pb
from fedmeta.common.wire import header_to_proto, run_config_to_proto

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Answers Join with a chosen model spec (and algorithm) and every WaitForAssignment with FINISHED."""

    def __init__(self, model: pb.ModelSpec, algorithm: str = "maml") -> None:
        self.model = model
        self.algorithm = algorithm
        self.parameters: tensor_pb.TensorSetHeader | None = None  # what FetchParameters declares
        self.chunks_sent = 0
        self.joined: list[str] = []
        self.polled: list[str] = []
        self._lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        config = run_config_to_proto(RunConfig(run_id="hostile"))
        config.model.CopyFrom(self.model)
        config.algorithm = self.algorithm
        with self._lock:
            self.joined.append(request.client_id)
        return pb.JoinResponse(config=config)

    def WaitForAssignment(self, request: pb.WaitForAssignmentRequest, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.polled.append(request.client_id)
        return pb.WaitForAssignmentResponse(action=pb.ACTION_FINISHED)

    def FetchParameters(self, request: pb.FetchParametersRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        assert self.parameters is not None
        yield pb.FetchParametersResponse(header=pb.ParametersHeader(parameter_version=request.parameter_version,
                                                                    tensors=self.parameters))
        for offset in range(0, 64 << 20, 1 << 20):  # as much as the client takes: it must stop at the header
            self.chunks_sent += 1
            yield pb.FetchParametersResponse(chunk=tensor_pb.TensorChunk(offset=offset, data=bytes(1 << 20)))


@pytest.fixture
def fake_coordinator() -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(model: pb.ModelSpec, algorithm: str = "maml") -> tuple[FakeCoordinator, int]:
        servicer = FakeCoordinator(model, algorithm)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(grace=None)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_client_refuses_code_named_by_the_coordinator_and_runs_an_allowed_import(
        fake_coordinator, processes, tmp_path: Path) -> None:
    marker = Path("/tmp") / f"pwned-{uuid.uuid4().hex}"
    shell = json.dumps({"args": f"touch {marker}", "shell": True})
    evil, evil_port = fake_coordinator(pb.ModelSpec(name="subprocess:run", kwargs_json=shell))
    # An import path this client's operator allows is still built (torch.nn:Linear, 1 -> 1, for sinusoid).
    linear = json.dumps({"in_features": 1, "out_features": 1})
    honest, honest_port = fake_coordinator(pb.ModelSpec(name="torch.nn:Linear", kwargs_json=linear))

    refused = processes.client(evil_port, "site-a", 1, "--give-up-s", "30",
                               "--allow-model-import", "torch.nn:Linear")  # allowing another path allows not this one
    allowed = processes.client(honest_port, "site-b", 2, "--give-up-s", "30",
                               "--allow-model-import", "os.path:join,torch.nn:Linear")

    assert refused.wait(60) == 1, refused.output()
    line = _last_line(refused.output())
    assert line.startswith("fedmeta-client: error: refusing the coordinator's run configuration: "
                           "model 'subprocess:run'"), refused.output()
    assert "--allow-model-import subprocess:run" in line
    assert "Traceback" not in refused.output()
    assert not marker.exists()
    assert evil.joined == ["site-a"] and evil.polled == []  # it joined, then stopped before any work

    assert allowed.wait(60) == 0, allowed.output()
    assert honest.joined == ["site-b"] and honest.polled == ["site-b"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (pb.ModelSpec(name="mlp", kwargs_json=json.dumps({"hidden": [65536, 65536, 65536]})), "parameters; at most"),
        (pb.ModelSpec(name="mlp", kwargs_json=json.dumps({"hidden": 10**12})), "hidden: expected a list"),
        (pb.ModelSpec(name="conv4", kwargs_json=json.dumps({"hidden": 1 << 20})), "hidden: expected an integer"),
        (pb.ModelSpec(name="mlp", kwargs_json=json.dumps({"bias": False})), r"unknown arguments \['bias'\]"),
        (pb.ModelSpec(name="resnet152"), "unknown model 'resnet152'"),
    ],
    ids=["too-many-parameters", "hidden-not-a-list", "conv-too-wide", "unknown-argument", "unknown-name"],
)
def test_worker_refuses_model_specs_that_would_allocate_or_are_unknown(fake_coordinator, model, message) -> None:
    """The same Join path in-process (no child process per case): a ClientError naming the problem."""
    from fedmeta.client.worker import ClientConfig, ClientError, Worker

    servicer, port = fake_coordinator(model)
    worker = Worker(ClientConfig(server=f"127.0.0.1:{port}", client_id="site-c", data_seed=0))
    try:
        with pytest.raises(ClientError, match=message):
            worker.join()
    finally:
        worker.channel.close()
    assert servicer.joined == ["site-c"]


def test_unknown_algorithm_from_the_coordinator_is_refused(fake_coordinator) -> None:
    from fedmeta.client.worker import ClientConfig, ClientError, Worker

    servicer, port = fake_coordinator(pb.ModelSpec(name="mlp", kwargs_json="{}"), algorithm="os.system")
    worker = Worker(ClientConfig(server=f"127.0.0.1:{port}", client_id="site-d", data_seed=0))
    try:
        with pytest.raises(ClientError, match="--algorithm: expected one of .*got 'os.system'"):
            worker.join()
    finally:
        worker.channel.close()


def test_no_reflection_leaves_health_and_hides_the_schema(inprocess_server) -> None:
    quiet = inprocess_server(no_reflection=True)
    loud = inprocess_server()

    def reflect(channel: grpc.Channel) -> set[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S)
        return {svc.name for r in replies for svc in r.list_services_response.service}

    with pytest.raises(grpc.RpcError) as err:
        reflect(quiet.channel)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert {"fedmeta.v1.Coordinator", "grpc.health.v1.Health"} <= reflect(loud.channel)
    health = health_pb2_grpc.HealthStub(quiet.channel)
    for service in ("", "fedmeta.v1.Coordinator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _header(specs: list[tuple[str, int, list[int]]]) -> tensor_pb.TensorSetHeader:
    """A header as a hostile coordinator sends it: consistent in itself (sizes add up), any specs."""
    sizes = {tensor_pb.DTYPE_FLOAT32: 4, tensor_pb.DTYPE_FLOAT16: 2, tensor_pb.DTYPE_FLOAT64: 8}
    total = 0
    for _, dtype, shape in specs:
        n = sizes[dtype]
        for d in shape:
            n *= d
        total += n
    return tensor_pb.TensorSetHeader(tensors=[tensor_pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in specs],
                                     total_bytes=total, sha256=bytes(32), encoding=tensor_pb.ENCODING_FLOAT32)


def _mlp_specs(dtype: int) -> list[tuple[str, int, list[int]]]:
    params = meta_parameters(RunConfig(run_id="hostile"), 0)
    return [(name, dtype, list(t.shape)) for name, t in params.items()]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([("net.0.weight", tensor_pb.DTYPE_FLOAT32, [1 << 20, 1 << 20])], "tensor names do not match the model"),
        ([(n, d, [1 << 20, 1 << 19] if n == "net.0.weight" else s) for n, d, s in _mlp_specs(tensor_pb.DTYPE_FLOAT32)],
         "tensor 'net.0.weight': expected shape"),
        (_mlp_specs(tensor_pb.DTYPE_FLOAT64), "over the cap of"),
    ],
    ids=["4-TiB-foreign-tensor", "4-TiB-wrong-shape", "float64-twice-the-model"],
)
def test_client_allocates_no_more_than_the_runs_model_for_a_parameter_stream(fake_coordinator, specs, message) -> None:
    """The header is checked against the run's own model before a buffer is allocated (4 TiB would crash)."""
    from fedmeta.client.worker import ClientConfig, ClientError, Worker

    servicer, port = fake_coordinator(pb.ModelSpec(name="mlp", kwargs_json=json.dumps(
        {"in_features": 1, "hidden": [40, 40], "out_features": 1})))
    servicer.parameters = _header(specs)
    worker = Worker(ClientConfig(server=f"127.0.0.1:{port}", client_id="site-e", data_seed=0))
    try:
        worker.join()
        assert worker.max_param_bytes == sum(4 * t.numel() for t in meta_parameters(worker.run, 0).values())
        with pytest.raises(ClientError, match=message):
            worker._fetch("v-hostile")
        # Inlined parameters with the same header are dropped (and fetched instead), not allocated.
        inline = pb.WaitForAssignmentResponse(action=pb.ACTION_TRAIN, parameter_version="v-inline",
                                              parameters=pb.InlineParameters(tensors=_header(specs), payload=b""))
        worker._take_inline(inline)
        assert worker._cached_version == "" and worker._params == {}
    finally:
        worker.channel.close()


def test_client_takes_honest_inlined_parameters(fake_coordinator) -> None:
    from fedmeta.client.worker import ClientConfig, Worker

    servicer, port = fake_coordinator(pb.ModelSpec(name="mlp", kwargs_json=json.dumps(
        {"in_features": 1, "hidden": [40, 40], "out_features": 1})))
    worker = Worker(ClientConfig(server=f"127.0.0.1:{port}", client_id="site-f", data_seed=0))
    try:
        run = worker.join()
        encoded = encode(meta_parameters(run, 7))
        inline = pb.WaitForAssignmentResponse(action=pb.ACTION_TRAIN, parameter_version="v7", parameters=pb.InlineParameters(
            tensors=header_to_proto(encoded.header), payload=bytes(encoded.payload)))
        worker._take_inline(inline)
        assert worker._cached_version == "v7" and set(worker._params) == set(meta_parameters(run, 0))
    finally:
        worker.channel.close()
