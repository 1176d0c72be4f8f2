"""Atomic checkpoints: round trip, interrupted writes, corrupted files."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedmeta.common.algorithms import OuterConfig
from fedmeta.common.algorithms.outer import AdamOuter
from fedmeta.server import checkpoint
from fedmeta.server.checkpoint import FILENAME, Checkpoint, candidates, load, read, save

TMP_NAME = f".{FILENAME}.tmp"


def make_checkpoint(seed: int, next_round: int = 3) -> Checkpoint:
    gen = torch.Generator().manual_seed(seed)
    return Checkpoint(
        theta=torch.randn(97, generator=gen),
        outer={"step": torch.tensor(next_round, dtype=torch.int64), "exp_avg": torch.randn(97, generator=gen),
               "exp_avg_sq": torch.rand(97, generator=gen)},
        meta={"next_round": next_round, "version": "ab" * 32, "clients": {"site-1": {"device": "cpu", "num_tasks": 0}},
              "clients_seen": ["site-1", "site-2"], "wall_s": 1.5, "config": {"algorithm": "maml", "inner_lr": 0.01}},
    )


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert torch.equal(a.theta, b.theta) and a.theta.dtype == b.theta.dtype
    assert a.outer.keys() == b.outer.keys()
    for k in a.outer:
        assert torch.equal(a.outer[k], b.outer[k]) and a.outer[k].dtype == b.outer[k].dtype, k
    assert a.meta == b.meta


def test_save_load_round_trip(tmp_path: Path) -> None:
    ckpt = make_checkpoint(0)
    path = save(tmp_path / "checkpoint", ckpt)
    assert path == tmp_path / "checkpoint" / FILENAME and path.is_file()
    assert not (tmp_path / "checkpoint" / TMP_NAME).exists()
    loaded = load(tmp_path / "checkpoint")
    assert loaded is not None
    assert_same(loaded, ckpt)


def test_round_trip_without_outer_state(tmp_path: Path) -> None:
    ckpt = Checkpoint(theta=torch.arange(5, dtype=torch.float32), outer={}, meta={})
    save(tmp_path, ckpt)
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, ckpt)


def test_save_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, make_checkpoint(1, next_round=1))
    newer = make_checkpoint(2, next_round=2)
    save(tmp_path, newer)
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.1.safetensors", FILENAME]
    previous = read(tmp_path / "state.1.safetensors")
    assert previous.meta["next_round"] == 1


def test_only_the_last_keep_checkpoints_are_kept(tmp_path: Path) -> None:
    for r in range(1, 6):
        save(tmp_path, make_checkpoint(r, next_round=r), keep=3)
    assert [read(p).meta["next_round"] for p in candidates(tmp_path)] == [5, 4, 3]
    save(tmp_path, make_checkpoint(6, next_round=6), keep=1)  # a smaller --keep-checkpoints drops the rest
    assert [p.name for p in candidates(tmp_path)] == [FILENAME]
    with pytest.raises(ValueError, match="keep"):
        save(tmp_path, make_checkpoint(7), keep=0)


def _nan_theta(ckpt: Checkpoint) -> Checkpoint:
    theta = ckpt.theta.clone()
    theta[3] = float("nan")
    return Checkpoint(theta, ckpt.outer, ckpt.meta)


def _inf_state(ckpt: Checkpoint) -> Checkpoint:
    outer = dict(ckpt.outer, exp_avg_sq=torch.full_like(ckpt.outer["exp_avg_sq"], float("inf")))
    return Checkpoint(ckpt.theta, outer, ckpt.meta)


def _other_theta(ckpt: Checkpoint) -> Checkpoint:
    return Checkpoint(ckpt.theta + 1.0, ckpt.outer, ckpt.meta)  # finite, but not the stored version


def _version(theta: torch.Tensor) -> str:
    return hashlib.sha256(theta.numpy().tobytes()).hexdigest()


def _with_version(ckpt: Checkpoint) -> Checkpoint:
    return Checkpoint(ckpt.theta, ckpt.outer, {**ckpt.meta, "version": _version(ckpt.theta)})


@pytest.mark.parametrize("spoil", [_nan_theta, _inf_state, _other_theta], ids=["nan-theta", "inf-adam-state", "wrong-version"])
def test_a_bad_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, spoil, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    good = _with_version(make_checkpoint(1, next_round=1))
    save(tmp_path, good)
    save(tmp_path, spoil(_with_version(make_checkpoint(2, next_round=2))))
    with caplog.at_level(logging.WARNING, logger="fedmeta.checkpoint"):
        loaded = load(tmp_path, version_of=_version)
    assert loaded is not None
    assert_same(loaded, good)
    assert str(tmp_path / FILENAME) in caplog.text and "previous checkpoint" in caplog.text
    assert "state.1.safetensors" in caplog.text  # which one it resumed from


def test_every_checkpoint_bad_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    save(tmp_path, _nan_theta(make_checkpoint(1, next_round=1)))
    save(tmp_path, _nan_theta(make_checkpoint(2, next_round=2)))
    with pytest.raises(ValueError, match="non-finite"):
        load(tmp_path)


def test_an_unreadable_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    good = make_checkpoint(1, next_round=1)
    save(tmp_path, good)
    save(tmp_path, make_checkpoint(2, next_round=2))
    (tmp_path / FILENAME).write_bytes(b"garbage")
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, good)


def test_a_gap_left_by_a_crash_between_renames_is_skipped(tmp_path: Path) -> None:
    save(tmp_path, make_checkpoint(1, next_round=1))
    save(tmp_path, make_checkpoint(2, next_round=2))
    (tmp_path / FILENAME).unlink()  # as if killed after shifting state -> state.1, before the last rename
    loaded = load(tmp_path)
    assert loaded is not None and loaded.meta["next_round"] == 1


def test_adam_state_survives_a_checkpoint(tmp_path: Path) -> None:
    config = OuterConfig(lr=0.01, rounds=10)
    outer = AdamOuter(config)
    theta = torch.randn(30, generator=torch.Generator().manual_seed(4))
    grads = [torch.randn(30, generator=torch.Generator().manual_seed(10 + i)) for i in range(5)]
    for r in range(2):
        outer.step(theta, grads[r], r)
    save(tmp_path, Checkpoint(theta, outer.state_dict(), {"next_round": 2}))
    loaded = load(tmp_path)
    assert loaded is not None
    resumed = AdamOuter(config)
    resumed.load_state_dict(loaded.outer)
    theta_resumed = loaded.theta.clone()
    for r in range(2, 5):
        outer.step(theta, grads[r], r)
        resumed.step(theta_resumed, grads[r], r)
    assert torch.equal(theta, theta_resumed)


def test_load_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    assert load(tmp_path) is None
    assert load(tmp_path / "does-not-exist") is None


@pytest.mark.parametrize("leftover", [b"", b"garbage \x00\xff" * 100, b"{\"truncated"], ids=["empty", "garbage", "truncated"])
def test_leftover_tmp_file_does_not_affect_load(tmp_path: Path, leftover: bytes) -> None:
    previous = make_checkpoint(3)
    save(tmp_path, previous)
    (tmp_path / TMP_NAME).write_bytes(leftover)  # a crash after writing the tmp file, before the rename
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, previous)
    newer = make_checkpoint(4)
    save(tmp_path, newer)  # the next save overwrites the leftover
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, newer)
    assert not (tmp_path / TMP_NAME).exists()


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = make_checkpoint(5)
    save(tmp_path, previous)

    def crash(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"theta\"")  # a half-written file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, make_checkpoint(6))
    loaded = load(tmp_path)
    assert loaded is not None
    assert_same(loaded, previous)


def write_state(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / FILENAME
    path.write_bytes(data)
    return path


def corrupt_by_truncation(tmp_path: Path) -> None:
    save(tmp_path, make_checkpoint(7))
    path = tmp_path / FILENAME
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_by_garbage(tmp_path: Path) -> None:
    write_state(tmp_path, b"not a safetensors file at all")


def corrupt_empty(tmp_path: Path) -> None:
    write_state(tmp_path, b"")


def corrupt_metadata_json(tmp_path: Path) -> None:
    save_file({"theta": torch.zeros(3)}, str(tmp_path / FILENAME), metadata={"fedmeta": "{not json"})


def corrupt_missing_metadata(tmp_path: Path) -> None:
    save_file({"theta": torch.zeros(3)}, str(tmp_path / FILENAME))


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_by_truncation, corrupt_by_garbage, corrupt_empty, corrupt_metadata_json, corrupt_missing_metadata],
    ids=["truncated", "garbage", "empty", "bad-metadata-json", "no-metadata"],
)
def test_corrupted_state_file_is_an_actionable_error(tmp_path: Path, corrupt) -> None:  # type: ignore[no-untyped-def]
    corrupt(tmp_path)
    with pytest.raises(ValueError) as info:
        load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / FILENAME) in message
    assert "unreadable" in message and "move it away" in message


def test_state_file_without_theta_is_an_actionable_error(tmp_path: Path) -> None:
    save_file({"outer.step": torch.tensor(1)}, str(tmp_path / FILENAME), metadata={"fedmeta": json.dumps({"next_round": 1})})
    with pytest.raises(ValueError, match="move it away"):
        load(tmp_path)


def test_the_newest_file_never_disappears_during_a_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, make_checkpoint(1, next_round=1))
    seen: list[bool] = []
    real_replace = checkpoint.os.replace

    def watching(src, dst):  # type: ignore[no-untyped-def]
        seen.append((tmp_path / FILENAME).exists())
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", watching)
    save(tmp_path, make_checkpoint(2, next_round=2), keep=3)
    save(tmp_path, make_checkpoint(3, next_round=3), keep=3)
    assert seen and all(seen)
    assert [read(p).meta["next_round"] for p in candidates(tmp_path)] == [3, 2, 1]
