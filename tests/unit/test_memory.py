"""server/memory.py: the glibc allocator setting is applied where it can be, and never overrides the environment."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from fedmeta.server import memory


def test_threshold_zero_leaves_malloc_dynamic():
    assert memory.fix_mmap_threshold(0) is False


def test_the_environment_variable_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.fix_mmap_threshold(65536) is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="glibc's mallopt")
def test_threshold_is_fixed_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.fix_mmap_threshold(65536) is True


def test_freezing_the_start_up_objects_takes_them_out_of_full_collections():
    import gc

    class Cycle:
        pass

    def cycle() -> Cycle:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        return a

    kept = cycle()
    try:
        frozen = memory.freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 1000  # the imports' objects, at least
        assert not any(o is kept for o in gc.get_objects())  # out of the generations the collector walks
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
