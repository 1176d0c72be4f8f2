"""Regenerate the Python code for protos/fedmeta/v1/*.proto into common/proto/.

grpc_tools emits absolute imports (``from fedmeta.v1 import tensor_pb2``) that only
resolve when the output folder is on sys.path; we rewrite them to the package path
``fedmeta.common.proto.fedmeta.v1`` so the generated modules import as part of
``fedmeta.common`` (the folder common/ installs as fedmeta.common, see pyproject.toml).

Usage: python scripts/gen_protos.py [--out DIR]   (default: common/proto)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "fedmeta.common.proto"
_IMPORT = re.compile(r"^from fedmeta\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto under protos/ and return the files written."""
    from grpc_tools import protoc  # only needed at generation time

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or path.name == "__init__.py":
            continue
        text = path.read_text()
        path.write_text(_IMPORT.sub(f"from {PACKAGE}.fedmeta.v1 import ", text))
        written.append(path)
    for package_dir in (out_dir / "fedmeta", out_dir / "fedmeta" / "v1"):
        init = package_dir / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "common" / "proto")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    sys.exit(main())
