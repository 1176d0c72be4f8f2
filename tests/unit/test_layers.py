"""The layers of docs/ARCHITECTURE.md, held against every import in the code.

`common` is pure code and imports neither `server` nor `client`; `server` and `client`
never import each other; no module imports itself back through others (no circle), counting
imports inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "server", "client")
GENERATED = ROOT / "common" / "proto"


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if GENERATED in path.parents or path.name == "__main__.py":
                continue
            found[_module_of(path)] = path
    return found


def _local(name: str) -> str | None:
    """An imported name as one of our modules' names (with or without the fedmeta. prefix)."""
    name = name.removeprefix("fedmeta.")
    return name if name.split(".")[0] in PACKAGES else None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{a.name}" if _local(f"{base}.{a.name}") in modules else base for a in node.names]
        for n in names:
            local = _local(n)
            while local is not None and local not in modules and "." in local:
                local = local.rsplit(".", 1)[0]
            if local is not None and local in modules:
                out.add(local)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_layers() -> None:
    wrong = [(m, d) for m, deps in _graph().items() for d in deps
             if (m.startswith("common") and d.split(".")[0] in ("server", "client"))
             or (m.startswith("server") and d.startswith("client"))
             or (m.startswith("client") and d.startswith("server"))]
    assert not wrong, f"imports across the layers: {wrong}"


def test_no_import_circle() -> None:
    graph = _graph()
    # A package's __init__ importing its own modules is how a package is built; a module
    # importing its package's __init__ back would close a circle and is counted.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
