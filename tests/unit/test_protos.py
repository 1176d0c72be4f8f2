"""The wire contract: committed generated code is current, importable as a package, and well formed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "fedmeta" / "v1"
GENERATED = ROOT / "common" / "proto"
REGENERATE = "run `python scripts/gen_protos.py` and commit the result"


def load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    written = load_gen_protos().generate(out)
    assert written, "gen_protos.generate wrote nothing"
    return out


def generated_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".pyi")
            and "__pycache__" not in p.parts}


def test_regenerated_code_matches_the_committed_code(regenerated: Path) -> None:
    fresh = generated_files(regenerated)
    assert {"fedmeta/v1/coordinator_pb2.py", "fedmeta/v1/coordinator_pb2_grpc.py", "fedmeta/v1/tensor_pb2.py"} <= fresh
    committed = generated_files(GENERATED) - {"__init__.py"}  # common/proto/__init__.py is written by hand
    missing = sorted(fresh - committed)
    stale = sorted(committed - fresh)
    assert not missing, f"generated files missing from common/proto: {missing}; {REGENERATE}"
    assert not stale, f"files in common/proto that no .proto generates: {stale}; delete them or {REGENERATE}"
    differ = sorted(rel for rel in fresh if (regenerated / rel).read_bytes() != (GENERATED / rel).read_bytes())
    assert not differ, f"common/proto is out of date with protos/ ({differ}); {REGENERATE}"


def test_regenerated_imports_use_the_package_path(regenerated: Path) -> None:
    grpc_module = (regenerated / "fedmeta" / "v1" / "coordinator_pb2_grpc.py").read_text()
    assert "from fedmeta.common.proto.fedmeta.v1 import coordinator_pb2" in grpc_module
    for path in regenerated.rglob("*.py"):
        assert not re.search(r"^from fedmeta\.v1 import", path.read_text(), re.MULTILINE), path


def test_generated_modules_import_as_a_package() -> None:
    from fedmeta.common.proto import pb, pb_grpc, tensor_pb

    assert pb.DESCRIPTOR.package == tensor_pb.DESCRIPTOR.package == "fedmeta.v1"
    assert pb.__name__ == "fedmeta.common.proto.fedmeta.v1.coordinator_pb2"
    assert hasattr(pb_grpc, "CoordinatorStub") and hasattr(pb_grpc, "CoordinatorServicer")
    # The coordinator's messages use the very TensorSetHeader class the codec builds.
    assert pb.UpdateHeader.DESCRIPTOR.fields_by_name["tensors"].message_type is tensor_pb.TensorSetHeader.DESCRIPTOR
    assert "fedmeta/v1/tensor.proto" in [d.name for d in pb.DESCRIPTOR.dependencies]


def all_enums(file: FileDescriptor) -> list[EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())

    def walk(message: Descriptor) -> None:
        enums.extend(message.enum_types)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return enums


def test_every_enum_starts_with_unspecified() -> None:
    from fedmeta.common.proto import pb, tensor_pb

    enums = all_enums(pb.DESCRIPTOR) + all_enums(tensor_pb.DESCRIPTOR)
    assert {"Action", "UpdateKind", "DType", "Encoding"} <= {e.name for e in enums}
    for enum in enums:
        zero = enum.values_by_number[0]
        assert zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name}: the zero value is {zero.name}"
        assert enum.values[0].number == 0, enum.full_name


_FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?(?:map\s*<[^>]+>|[A-Za-z_][\w.]*)\s+[A-Za-z_]\w*\s*=\s*\d+\s*[;\[]")


def message_fields(text: str) -> list[tuple[str, bool]]:
    """Each field declared in a `message` (or its `oneof`), with whether a // comment line precedes it."""
    fields = []
    blocks: list[str] = []
    previous = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        opened = re.match(r"^(message|enum|oneof|service)\s+\w+\s*\{", line)
        if opened:
            blocks.append(opened.group(1))
            if line.endswith("}"):  # an empty block on one line, e.g. `message LeaveResponse {}`
                blocks.pop()
        elif line.startswith("}"):
            blocks.pop()
        elif blocks and blocks[-1] in ("message", "oneof") and _FIELD.match(line):
            fields.append((f"line {number}: {line}", previous.startswith("//")))
        previous = line
    assert not blocks, f"unbalanced braces: {blocks}"
    return fields


def test_field_comment_parser() -> None:
    text = (
        "message A {\n  // commented\n  string a = 1;\n  uint32 b = 2;\n  map<string, double> c = 3;\n"
        "  oneof m {\n    // commented\n    B x = 4;\n    repeated int64 y = 5;\n  }\n}\n"
        "message Empty {}\nenum E {\n  E_UNSPECIFIED = 0;\n}\n// trailing\nmessage C {\n  fedmeta.v1.B z = 1;\n}\n"
    )
    assert message_fields(text) == [
        ("line 3: string a = 1;", True), ("line 4: uint32 b = 2;", False), ("line 5: map<string, double> c = 3;", False),
        ("line 8: B x = 4;", True), ("line 9: repeated int64 y = 5;", False), ("line 18: fedmeta.v1.B z = 1;", False),
    ]


@pytest.mark.parametrize("proto", sorted(p.name for p in PROTO_DIR.glob("*.proto")))
def test_every_message_field_is_commented(proto: str) -> None:
    text = (PROTO_DIR / proto).read_text()
    assert re.search(r"^package fedmeta\.v1;", text, re.MULTILINE)
    fields = message_fields(text)
    declared = len(re.findall(r"=\s*\d+\s*;", text)) - len(re.findall(r"^\s*[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;", text, re.MULTILINE))
    assert len(fields) == declared > 0, "the parser missed some field declarations"
    problems = [line for line, commented in fields if not commented]
    assert not problems, f"{proto}: fields without a // comment on the line above: {problems}"
