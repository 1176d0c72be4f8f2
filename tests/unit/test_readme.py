"""The README's security and failure tables name tests that exist (so the tables cannot drift from the suite)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# `file.py::test_name`, `…::test_name` (same file as the previous one), `unit/file.py` or `docker/file.py`
_REF = re.compile(r"`((?:unit/|docker/)?test_\w+\.py)?(?:…)?(?:::(test_\w+))?`")


def _section(title: str, until: str) -> str:
    start = README.index(title)
    return README[start:README.index(until, start)]


def _references() -> list[tuple[Path, str | None]]:
    text = _section("### Threat model", "## Docker\n")
    refs: list[tuple[Path, str | None]] = []
    last: Path | None = None
    for m in _REF.finditer(text):
        name, test = m.group(1), m.group(2)
        if name is None and test is None:
            continue
        if name is not None:
            folder = "tests" if name.startswith(("unit/", "docker/")) else "tests/integration"
            last = ROOT / folder / name
        assert last is not None, f"{m.group(0)} names no file before it"
        refs.append((last, test))
    return refs


def test_every_test_the_security_and_failure_tables_name_exists() -> None:
    refs = _references()
    assert len(refs) >= 30, f"expected the tables to name tests, found {len(refs)}"
    missing = []
    for path, test in refs:
        if not path.is_file():
            missing.append(str(path.relative_to(ROOT)))
        elif test is not None and not re.search(rf"^\s*def {test}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{path.relative_to(ROOT)}::{test}")
    assert not missing, f"README names tests that do not exist: {missing}"


def test_every_row_of_the_tables_names_a_test() -> None:
    text = _section("### Threat model", "## Docker\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    body = [r for r in rows if not r.startswith(("| threat", "| failure", "| party"))]
    # The trust table (party, trusted with, not trusted with) has no tests; the other two do, in their last column.
    tested = [r for r in body if r.count("|") >= 4 and not re.match(r"\| (the coordinator's operator|a client's operator|"
                                                                    r"the coordinator, as|a client, as|the network|files in)", r)]
    assert tested and all("test_" in r.rsplit("|", 2)[-2] for r in tested), [r[:80] for r in tested if "test_" not in r.rsplit("|", 2)[-2]]
