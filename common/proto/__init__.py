"""Generated protobuf and gRPC code for ``protos/fedmeta/v1`` (do not edit; run scripts/gen_protos.py)."""

from fedmeta.common.proto.fedmeta.v1 import admin_pb2 as admin_pb
from fedmeta.common.proto.fedmeta.v1 import admin_pb2_grpc as admin_pb_grpc
from fedmeta.common.proto.fedmeta.v1 import coordinator_pb2 as pb
from fedmeta.common.proto.fedmeta.v1 import coordinator_pb2_grpc as pb_grpc
from fedmeta.common.proto.fedmeta.v1 import tensor_pb2 as tensor_pb

__all__ = ["admin_pb", "admin_pb_grpc", "pb", "pb_grpc", "tensor_pb"]
