"""Credential files are born private: fedmeta-certs' keys and fedmeta-tokens' files are created 0600
by os.open (never chmod-ed after the data is written), even under a permissive umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmeta.server.auth import issue_tokens, parse_tokens_file
from fedmeta.server.certs import main as certs_main
from fedmeta.server.private_files import write_file


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every os.open (path, flags, mode); any chmod of a file fails the test."""
    seen: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: os.PathLike[str] | str, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        seen.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]

    def no_chmod(*args: object, **kwargs: object) -> None:
        pytest.fail(f"chmod called on {args[:1]}: the mode must come from the file's creation")

    monkeypatch.setattr(os, "open", spy)
    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    return seen


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _born_private(opens: list[tuple[str, int, int]], path: Path) -> bool:
    """The data reached `path` through a file created exclusively with mode 0600 in its folder."""
    prefix = str(path.parent / f".{path.name}.")
    return any(p.startswith(prefix) and flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600
               for p, flags, mode in opens)


def test_certificate_keys_are_born_0600_under_umask_0(tmp_path: Path, permissive_umask: None,
                                                      opens: list[tuple[str, int, int]]) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server-key.pem").write_text("an old key\n")
    assert _mode(out / "server-key.pem") == 0o666  # world-readable: regenerating must not write into it
    assert certs_main(["--out", str(out), "--clients", "site-a"]) == 0
    for key in ("ca-key.pem", "server-key.pem", "client-site-a-key.pem"):
        assert _mode(out / key) == 0o600, key
        assert _born_private(opens, out / key), key
        assert (out / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for cert in ("ca.pem", "server.pem", "client-site-a.pem"):
        assert _mode(out / cert) == 0o644, cert
    assert not list(out.glob(".*.tmp"))


def test_token_files_and_a_new_tokens_file_are_born_0600(tmp_path: Path, permissive_umask: None,
                                                         opens: list[tuple[str, int, int]]) -> None:
    tokens_file, out = tmp_path / "tokens.txt", tmp_path / "tokens"
    issue_tokens(["site-a", "site-b"], tokens_file, out)
    assert _mode(tokens_file) == 0o600
    assert any(p == str(tokens_file) and flags & os.O_CREAT and mode == 0o600 for p, flags, mode in opens)
    for client in ("site-a", "site-b"):
        path = out / f"token-{client}.txt"
        assert _mode(path) == 0o600 and _born_private(opens, path)
        assert len(path.read_text().strip()) == 64
    assert sorted(parse_tokens_file(tokens_file)) == ["site-a", "site-b"]


def test_an_existing_tokens_file_keeps_its_mode_and_is_appended(tmp_path: Path, permissive_umask: None) -> None:
    tokens_file = tmp_path / "tokens.txt"
    issue_tokens(["site-a"], tokens_file, tmp_path / "tokens")
    tokens_file.chmod(0o640)  # the operator's choice (e.g. a group the coordinator runs as)
    issue_tokens(["site-b"], tokens_file, tmp_path / "tokens")
    assert _mode(tokens_file) == 0o640
    assert sorted(parse_tokens_file(tokens_file)) == ["site-a", "site-b"]


def test_write_file_replaces_a_wider_file_and_leaves_no_temporary(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "key.pem"
    path.write_text("old")
    path.chmod(0o666)
    write_file(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]
    with pytest.raises(FileNotFoundError):
        write_file(tmp_path / "missing" / "key.pem", b"x")


def test_revoke_edits_the_tokens_file_in_place_and_a_running_store_sees_it(tmp_path: Path) -> None:
    """docker-compose.tls.yml mounts tokens.txt as a file: a revocation must keep the same inode."""
    from fedmeta.server.auth import TokenStore, main as tokens_main

    tokens_file, out = tmp_path / "tokens.txt", tmp_path / "tokens"
    assert tokens_main(["--clients", "site-a,site-b,a", "--tokens-file", str(tokens_file), "--out", str(out)]) == 0
    os.utime(tokens_file, ns=(10**18, 10**18))  # an old stamp, so the edit below is seen whatever the clock tick
    token = {c: (out / f"token-{c}.txt").read_text().strip() for c in ("site-a", "site-b", "a")}
    store = TokenStore(tokens_file)
    assert all(store.check(c, t) for c, t in token.items())
    before = tokens_file.stat()
    assert tokens_main(["--revoke", "site-a", "--tokens-file", str(tokens_file)]) == 0
    after = tokens_file.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert not store.check("site-a", token["site-a"])
    assert store.check("site-b", token["site-b"]) and store.check("a", token["a"])  # "a" is not a prefix match
    assert sorted(parse_tokens_file(tokens_file)) == ["a", "site-b"]
    with pytest.raises(SystemExit):
        tokens_main(["--revoke", "site-a", "--clients", "x", "--tokens-file", str(tokens_file)])
