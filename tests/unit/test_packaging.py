"""The `fedmeta` namespace: the folders common/, server/, client/ install as fedmeta.common,
fedmeta.server, fedmeta.client; the code imports them only by those names; `python -m server` and
`python -m client` stay thin aliases that import nothing under a second name; a wheel built from
the folders the Docker images copy holds exactly the fedmeta.* packages and the .pyi stubs."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"common": "fedmeta.common", "server": "fedmeta.server", "client": "fedmeta.client"}
OLD_NAMES = tuple(FOLDERS)
SOURCES = ["common", "server", "client", "benchmarks", "tests", "docker", "scripts"]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_folder() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    found = {FOLDERS[init.relative_to(ROOT).parts[0]] + "".join(f".{p}" for p in init.parent.relative_to(ROOT).parts[1:])
             for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert sorted(setuptools["packages"]) == sorted(found)
    assert not (ROOT / "fedmeta").exists(), "fedmeta is a namespace made by the mapping, not a folder"


def test_console_scripts_name_the_fedmeta_packages() -> None:
    scripts = pyproject()["project"]["scripts"]
    assert scripts["fedmeta-server"] == "fedmeta.server.cli:main"
    assert scripts["fedmeta-client"] == "fedmeta.client.cli:main"
    assert all(target.startswith(("fedmeta.server.", "fedmeta.client.")) for target in scripts.values()), scripts


def _old_imports(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OLD_NAMES]
    return bad


def test_nothing_imports_the_top_level_names() -> None:
    files = [p for d in SOURCES for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(files) > 100
    bad = [hit for path in files for hit in _old_imports(path)]
    assert not bad, f"import fedmeta.common / fedmeta.server / fedmeta.client instead: {bad}"


@pytest.mark.parametrize("alias", ["server", "client"])
def test_the_python_m_alias_runs_and_imports_nothing_twice(alias: str) -> None:
    """`python -m server` from the repository root: the top-level `server` package is imported for
    its __main__ only; everything else (fedmeta.server.cli and all it needs) under fedmeta.*."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", alias, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: fedmeta-{alias} "), done.stdout[:200]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert f"fedmeta.{alias}.cli" in imported
    twice = sorted(m for m in imported if m.split(".")[0] in OLD_NAMES and m != alias)
    assert not twice, f"imported under the old top-level names as well: {twice}"


def test_a_wheel_from_the_docker_source_folders_holds_the_fedmeta_packages(tmp_path: Path) -> None:
    """The files the Dockerfiles copy into /tmp/src (pyproject.toml, README.md, common/, server/,
    client/) build a wheel with fedmeta/common, fedmeta/server, fedmeta/client and the .pyi stubs,
    and nothing at the top level but fedmeta/ and its dist-info."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fedmeta-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"fedmeta", wheel.name.split("-py")[0] + ".dist-info"}
    assert {n.split("/")[1] for n in names if n.startswith("fedmeta/")} == {"common", "server", "client"}
    assert "fedmeta/__init__.py" not in names
    expected = {f"fedmeta/{FOLDERS[p.relative_to(ROOT).parts[0]].split('.')[1]}/{p.relative_to(ROOT / p.relative_to(ROOT).parts[0])}"
                for folder in FOLDERS for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".pyi")
                and "__pycache__" not in p.parts}
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    assert {"fedmeta/common/proto/fedmeta/v1/coordinator_pb2.pyi", "fedmeta/common/proto/fedmeta/v1/tensor_pb2.pyi",
            "fedmeta/server/__main__.py", "fedmeta/client/__main__.py"} <= names
