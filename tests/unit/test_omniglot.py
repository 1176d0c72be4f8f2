"""Omniglot loading, caching, partitioning and sampling, on small fake archives (tests/omniglot_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.models import Conv4, default_model
from fedmeta.common.tasks import make_tasks
from fedmeta.common.tasks import omniglot, omniglot_data
from fedmeta.common.tasks.omniglot import OmniglotTasks, load_omniglot, partition_classes, partition_drawings
from tests.omniglot_fixtures import write_fake_omniglot

ALPHABETS = {"Alpha": 4, "Beta": 3, "Gamma": 5, "Delta": 2, "Epsilon": 4, "Zeta": 3}  # 21 characters


@pytest.fixture(autouse=True)
def _private_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    write_fake_omniglot(root, alphabets=ALPHABETS, drawings=6, size=48)
    return root


def _tasks(data_dir: Path, **kw: object) -> OmniglotTasks:
    args: dict = {"ways": 3, "partition": "alphabet", "shards": 2, "shard": 0, "seed": 0, "rotations": False, **kw}
    return OmniglotTasks(data_dir, **args)


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(data: bytes, name: str) -> np.ndarray:
        raise AssertionError(f"decoded {name}: the cache was not used")

    monkeypatch.setattr(omniglot_data, "_decode_png", boom)


# ---------------------------------------------------------------------------- loading and cache

def test_zip_and_extracted_tree_load_identically(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path / "z", alphabets={"Alpha": 2, "Beta": 3}, drawings=4, as_zip=True)
    write_fake_omniglot(tmp_path / "t", alphabets={"Alpha": 2, "Beta": 3}, drawings=4, as_zip=False)
    write_fake_omniglot(tmp_path / "flat", alphabets={"Alpha": 2, "Beta": 3}, drawings=4, as_zip=False, name=None)
    z, t, flat = (load_omniglot(tmp_path / d) for d in ("z", "t", "flat"))
    for other in (t, flat):
        assert other.names == z.names == [f"{a}/character{c:02d}" for a, n in (("Alpha", 2), ("Beta", 3))
                                          for c in range(1, n + 1)]
        np.testing.assert_array_equal(np.asarray(other.images), np.asarray(z.images))
        np.testing.assert_array_equal(other.counts, [4] * 5)
    assert z.images.shape == (20, 28, 28) and z.images.dtype == np.uint8


def test_pixels_are_strokes_on_zero_background(fake_dir: Path) -> None:
    images = np.asarray(load_omniglot(fake_dir).images)
    assert images[:, 0, 0].max() == 0 and images.max() == 255  # corners are background, strokes are bright
    assert images.mean() < 0.3 * 255
    batch = _tasks(fake_dir).sample("train", num_tasks=2, shots=1, queries=1, seed=0)
    assert 0.0 <= batch.x_support.min() and batch.x_support.max() <= 1.0 and batch.x_support.max() == 1.0


def test_overlapping_background_archives_are_deduplicated(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Greek": 2, "Korean": 2}, name="images_background_small1")
    write_fake_omniglot(tmp_path, alphabets={"Greek": 2, "Tagalog": 3}, name="images_background_small2")
    data = load_omniglot(tmp_path)
    assert sorted(data.names) == sorted({*(f"Greek/character0{i}" for i in (1, 2)),
                                         *(f"Korean/character0{i}" for i in (1, 2)),
                                         *(f"Tagalog/character0{i}" for i in (1, 2, 3))})
    assert set(data.splits) == {"background"}


def test_cache_is_written_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3)
    first = load_omniglot(tmp_path)
    cache = tmp_path / ".fedmeta-cache"
    assert (cache / "omniglot.json").is_file() and len(list(cache.glob("images-*.npy"))) == 1
    stamp = (cache / "omniglot.json").stat().st_mtime_ns
    _forbid_decoding(monkeypatch)
    second = load_omniglot(tmp_path)
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))
    assert second.names == first.names and (cache / "omniglot.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "xdg").exists()


def test_cache_is_rebuilt_when_the_source_changes(tmp_path: Path) -> None:
    archive = write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3, seed=0)
    first = load_omniglot(tmp_path)
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 3}, drawings=3, seed=1)
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    second = load_omniglot(tmp_path)
    assert len(second.names) == 5 and len(first.names) == 4
    assert not np.array_equal(np.asarray(second.images[:6]), np.asarray(first.images[:6]))
    assert len(list((tmp_path / ".fedmeta-cache").glob("images-*.npy"))) == 1  # the stale one is gone


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3)
    first = load_omniglot(tmp_path)
    for f in (tmp_path / ".fedmeta-cache").glob("images-*.npy"):
        f.write_bytes(b"truncated")
    np.testing.assert_array_equal(np.asarray(load_omniglot(tmp_path).images), np.asarray(first.images))


def test_unwritable_cache_location_falls_back_to_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    write_fake_omniglot(data_dir, alphabets={"Alpha": 2, "Beta": 2}, drawings=3)
    (data_dir / ".fedmeta-cache").write_text("a file where the cache folder would go")
    first = load_omniglot(data_dir)
    xdg_caches = list((tmp_path / "xdg" / "fedmeta").glob("omniglot-*/omniglot.json"))
    assert len(xdg_caches) == 1 and xdg_caches[0].parent == omniglot.cache_dirs(data_dir)[1]
    _forbid_decoding(monkeypatch)
    np.testing.assert_array_equal(np.asarray(load_omniglot(data_dir).images), np.asarray(first.images))


def test_read_only_data_dir_is_left_untouched(tmp_path: Path) -> None:
    # Root passes os.access checks everywhere, so the loader also honours a folder's missing
    # write bits; that makes this test meaningful whoever runs it.
    data_dir = tmp_path / "data"
    write_fake_omniglot(data_dir, alphabets={"Alpha": 2, "Beta": 2}, drawings=3)
    data_dir.chmod(0o555)
    try:
        load_omniglot(data_dir)
        assert not (data_dir / ".fedmeta-cache").exists()
        assert list((tmp_path / "xdg" / "fedmeta").glob("omniglot-*/images-*.npy"))
    finally:
        data_dir.chmod(0o755)


def test_no_writable_cache_warns_and_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_omniglot(tmp_path / "data", alphabets={"Alpha": 2, "Beta": 2}, drawings=3)
    (tmp_path / "data" / ".fedmeta-cache").write_text("")
    (tmp_path / "xdg").write_text("")
    with pytest.warns(UserWarning, match="cache not written"):
        assert len(load_omniglot(tmp_path / "data").names) == 4


# ---------------------------------------------------------------------------- malformed inputs

def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--data-dir .*nope: no such directory"):
        load_omniglot(tmp_path / "nope")


def test_dir_without_data_names_the_official_archives(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match=r"images_background\*\.zip.*github\.com/brendenlake/omniglot"):
        load_omniglot(tmp_path)


@pytest.mark.parametrize("as_zip", [True, False])
def test_empty_alphabet(tmp_path: Path, as_zip: bool) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Hollow": 0}, drawings=3, as_zip=as_zip)
    with pytest.raises(ValueError, match=r"alphabet 'Hollow' .* has no characters"):
        load_omniglot(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    tree = write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3, as_zip=False)
    bad = sorted((tree / "Beta" / "character02").glob("*.png"))[1]
    bad.write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(ValueError, match=rf"{bad.name}: cannot decode"):
        load_omniglot(tmp_path)


def test_character_with_fewer_than_two_drawings_fails_at_load(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 2, "Beta": 2}, drawings=3, drawings_of={"Beta/character01": 1})
    with pytest.raises(ValueError, match=r"character Beta/character01 has 1 drawing"):
        load_omniglot(tmp_path)


def test_too_few_drawings_for_shots_plus_queries(fake_dir: Path) -> None:
    tasks = _tasks(fake_dir)
    with pytest.raises(ValueError, match=r"--shots/--queries: shots \+ queries = 7 .* only 6 drawings"):
        tasks.sample("train", num_tasks=1, shots=2, queries=5, seed=0)
    with pytest.raises(ValueError, match=r"--eval-shots/--eval-queries"):
        tasks.sample("eval", num_tasks=1, shots=6, queries=1, seed=0)
    tasks.sample("train", num_tasks=1, shots=1, queries=5, seed=0)  # exactly all 6 drawings is fine


def test_fewer_classes_than_ways(fake_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"--ways 30: the train pool .* has only"):
        _tasks(fake_dir, ways=30)


# ---------------------------------------------------------------------------- partitioning

ALPHABET_OF = [a for a, n in ALPHABETS.items() for _ in range(n)]


@pytest.mark.parametrize("partition", ["alphabet", "characters"])
@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_partition_is_disjoint_complete_deterministic(partition: str, shards: int) -> None:
    parts = partition_classes(ALPHABET_OF, partition=partition, shards=shards, seed=7)
    flat = [i for p in parts for i in p]
    assert len(parts) == shards and sorted(flat) == list(range(len(ALPHABET_OF)))  # disjoint and complete
    assert all(parts)
    assert parts == partition_classes(ALPHABET_OF, partition=partition, shards=shards, seed=7)
    alphabets_of = [{ALPHABET_OF[i] for i in p} for p in parts]
    if partition == "alphabet":
        assert all(not (a & b) for i, a in enumerate(alphabets_of) for b in alphabets_of[i + 1:])
    else:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        if shards <= min(ALPHABETS.values()):
            assert all(a == set(ALPHABETS) for a in alphabets_of)  # every client sees every alphabet


def test_partition_depends_on_seed() -> None:
    runs = {str(partition_classes(ALPHABET_OF, partition="alphabet", shards=3, seed=s)) for s in range(6)}
    assert len(runs) > 1


@pytest.mark.parametrize("shards", [1, 3, 4, 7])
def test_iid_partition_splits_drawings(shards: int) -> None:
    assert partition_classes(ALPHABET_OF, partition="iid", shards=shards, seed=1) == [list(range(21))] * shards
    counts = [20, 20, 6, 9]
    parts = partition_drawings(counts, shards=shards, seed=1)
    for c, n in enumerate(counts):
        got = np.concatenate([parts[s][c] for s in range(shards)])
        assert sorted(got.tolist()) == list(range(n))  # disjoint and complete per class
        sizes = [len(parts[s][c]) for s in range(shards)]
        assert max(sizes) - min(sizes) <= 1
    again = partition_drawings(counts, shards=shards, seed=1)
    assert all(np.array_equal(a, b) for p, q in zip(parts, again) for a, b in zip(p, q))


def test_alphabet_partition_needs_enough_alphabets() -> None:
    with pytest.raises(ValueError, match=r"--partition alphabet with --shards 7: only 6 training alphabet"):
        partition_classes(ALPHABET_OF, partition="alphabet", shards=7, seed=0)


# ---------------------------------------------------------------------------- sampling

def _identify(fake_dir: Path) -> dict[bytes, str]:
    data = load_omniglot(fake_dir)
    names = np.repeat(np.array(data.names), data.counts)
    table = {np.asarray(img).tobytes(): str(n) for img, n in zip(data.images, names)}
    assert len(table) == len(names)  # every fake drawing is distinct
    return table


def _sampled_classes(x: torch.Tensor, table: dict[bytes, str]) -> set[str]:
    pixels = (x * 255).round().to(torch.uint8).reshape(-1, 28, 28).numpy()
    return {table[p.tobytes()] for p in pixels}


def test_batch_shapes_dtypes_and_labels(fake_dir: Path) -> None:
    batch = _tasks(fake_dir, ways=4, partition="characters", rotations=True).sample(
        "train", num_tasks=3, shots=2, queries=3, seed=5)
    assert batch.x_support.shape == (3, 8, 1, 28, 28) and batch.x_query.shape == (3, 12, 1, 28, 28)
    assert batch.x_support.dtype == batch.x_query.dtype == torch.float32
    assert batch.y_support.dtype == batch.y_query.dtype == torch.int64
    for y, k in ((batch.y_support, 2), (batch.y_query, 3)):
        assert y.shape == (3, 4 * k)
        for t in range(3):
            assert torch.bincount(y[t], minlength=4).tolist() == [k] * 4


def test_sampling_is_deterministic_in_the_seed(fake_dir: Path) -> None:
    tasks = _tasks(fake_dir, rotations=True)
    a, b, c = (tasks.sample("train", num_tasks=4, shots=1, queries=2, seed=s) for s in (11, 11, 12))
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.x_query, b.x_query)
    assert not torch.equal(a.x_query, c.x_query)
    other = _tasks(fake_dir, rotations=True).sample("train", num_tasks=4, shots=1, queries=2, seed=11)
    assert torch.equal(a.x_query, other.x_query)  # a fresh holder, same seed: same batch


def test_support_and_query_are_distinct_drawings_of_one_class(fake_dir: Path) -> None:
    table = _identify(fake_dir)
    batch = _tasks(fake_dir).sample("train", num_tasks=5, shots=2, queries=4, seed=3)
    for t in range(5):
        for n in range(3):
            xs, xq = batch.x_support[t][batch.y_support[t] == n], batch.x_query[t][batch.y_query[t] == n]
            drawings = (torch.cat([xs, xq]) * 255).round().to(torch.uint8).reshape(6, -1)
            assert len({d.numpy().tobytes() for d in drawings}) == 6  # without replacement
            assert len(_sampled_classes(torch.cat([xs, xq]), table)) == 1
        assert len(_sampled_classes(batch.x_support[t], table)) == 3  # the task's classes are distinct


def test_characters_with_unequal_drawing_counts(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 3, "Beta": 3, "Gamma": 3, "Delta": 3, "Epsilon": 3},
                        drawings=8, size=48, drawings_of={"Alpha/character02": 3, "Beta/character01": 2})
    table = _identify(tmp_path)
    tasks = _tasks(tmp_path, ways=2, partition="characters", shards=1)
    counts = {name: int(n) for name, n in zip(load_omniglot(tmp_path).names, load_omniglot(tmp_path).counts)}
    short = min(counts[c] for c in tasks.classes("train"))
    assert short in (2, 3)
    with pytest.raises(ValueError, match=rf"only {short} drawings per character"):
        tasks.sample("train", num_tasks=1, shots=1, queries=short, seed=0)
    batch = tasks.sample("train", num_tasks=50, shots=1, queries=short - 1, seed=0)
    for t in range(50):
        for n in range(2):
            x = torch.cat([batch.x_support[t][batch.y_support[t] == n], batch.x_query[t][batch.y_query[t] == n]])
            assert len(_sampled_classes(x, table)) == 1  # never a row past the class's own drawings


@pytest.mark.parametrize("partition", ["alphabet", "characters", "iid"])
def test_train_draws_from_own_shard_and_eval_from_held_out(fake_dir: Path, partition: str) -> None:
    table = _identify(fake_dir)
    shards = [_tasks(fake_dir, partition=partition, shards=2, shard=s) for s in range(2)]
    held = set(shards[0].classes("eval"))
    assert held == set(shards[1].classes("eval")) and held
    assert len({c.split("/")[0] for c in held}) == 1  # 20% of 6 alphabets, rounded, at least 1
    for tasks in shards:
        assert not held & set(tasks.classes("train"))
        train = tasks.sample("train", num_tasks=20, shots=1, queries=2, seed=1)
        assert _sampled_classes(torch.cat([train.x_support, train.x_query], 1), table) <= set(tasks.classes("train"))
        ev = tasks.sample("eval", num_tasks=20, shots=1, queries=2, seed=1)
        assert _sampled_classes(torch.cat([ev.x_support, ev.x_query], 1), table) <= held
    if partition != "iid":
        assert not set(shards[0].classes("train")) & set(shards[1].classes("train"))
    all_classes = set(load_omniglot(fake_dir).names)
    assert set(shards[0].classes("train")) | set(shards[1].classes("train")) | held == all_classes


def test_iid_shards_hold_disjoint_drawings(fake_dir: Path) -> None:
    def drawings(tasks: OmniglotTasks) -> set[bytes]:
        batch = tasks.sample("train", num_tasks=40, shots=1, queries=2, seed=2)
        x = (torch.cat([batch.x_support, batch.x_query], 1) * 255).round().to(torch.uint8).reshape(-1, 28 * 28)
        return {row.numpy().tobytes() for row in x}

    a, b = (_tasks(fake_dir, partition="iid", shards=2, shard=s) for s in range(2))
    assert not drawings(a) & drawings(b)
    with pytest.raises(ValueError, match=r"--partition iid splits each character's drawings over --shards 2"):
        a.sample("train", num_tasks=1, shots=2, queries=2, seed=0)  # 6 drawings / 2 shards = 3 each


def test_evaluation_archive_is_the_held_out_set(tmp_path: Path) -> None:
    write_fake_omniglot(tmp_path, alphabets={"Alpha": 3, "Beta": 3}, drawings=4)
    write_fake_omniglot(tmp_path, alphabets={"Omega": 4}, drawings=4, name="images_evaluation", seed=9)
    tasks = _tasks(tmp_path, partition="alphabet", shards=2)
    assert {c.split("/")[0] for c in tasks.classes("eval")} == {"Omega"}
    other = _tasks(tmp_path, partition="alphabet", shards=2, shard=1)
    assert sorted(tasks.classes("train") + other.classes("train")) == [f"{a}/character0{i}" for a in ("Alpha", "Beta")
                                                                        for i in (1, 2, 3)]


def test_rotations_make_four_classes_per_character(fake_dir: Path) -> None:
    plain, rotated = _tasks(fake_dir, rotations=False), _tasks(fake_dir, rotations=True)
    assert rotated.num_classes("train") == 4 * plain.num_classes("train") == 4 * len(plain.classes("train"))
    assert rotated.num_classes("eval") == 4 * plain.num_classes("eval")
    table = _identify(fake_dir)
    turns_seen: set[int] = set()
    batch = rotated.sample("eval", num_tasks=30, shots=1, queries=1, seed=4)
    for img in batch.x_support.reshape(-1, 28, 28):
        matches = [k for k in range(4) if (torch.rot90(img, -k) * 255).round().to(torch.uint8).numpy().tobytes() in table]
        assert matches and table[(torch.rot90(img, -matches[0]) * 255).round().to(torch.uint8).numpy().tobytes()] \
            in rotated.classes("eval")  # a held-out character, rotated
        turns_seen.add(matches[0])
    assert turns_seen == {0, 1, 2, 3}


def test_conv4_runs_on_a_sampled_task(fake_dir: Path) -> None:
    batch = _tasks(fake_dir, ways=5, partition="characters").sample("train", num_tasks=2, shots=1, queries=1, seed=0)
    logits = Conv4(in_channels=1, ways=5)(batch.x_support[0])
    assert logits.shape == (5, 5) and torch.isfinite(logits).all()


def test_make_tasks_builds_omniglot(fake_dir: Path) -> None:
    run = RunConfig(run_id="r", task="omniglot", model=default_model("omniglot"), ways=5, shards=2,
                    partition="characters", rotations=True, queries=5, inner_lr=0.4)
    tasks = make_tasks(run, shard=3, data_dir=fake_dir)  # shard taken modulo --shards
    assert tasks.classification
    batch = tasks.sample("train", num_tasks=2, shots=1, queries=5, seed=0)
    assert batch.x_query.shape == (2, 25, 1, 28, 28)
    with pytest.raises(ValueError, match="--data-dir"):
        make_tasks(run, data_dir=None)
