"""The allocator setting that keeps the coordinator's memory O(model) under concurrency.

glibc's malloc serves allocations of at least M_MMAP_THRESHOLD bytes with their own mmap,
returned to the system on free; smaller ones come from heap arenas, which keep freed memory.
By default the threshold is dynamic: every time a mapped block is freed it rises to that
block's size (up to 32 MiB). The coordinator frees megabyte buffers all the time (gRPC
messages of --chunk-bytes, their serialised copies, decoded updates), so after the first
round every such buffer comes from an arena, one arena per thread that touched it, and
the arenas grow to hold the most buffers ever live at once in each of them.

The threshold is fixed at 64 KiB, below glibc's own starting value of 128 KiB: with hundreds
of connections, buffers between 64 and 128 KiB pile up in the arenas as well (which ones is
not traced; the growth they cause rises with the number of connections).
benchmarks/load_clients.py, 256 clients uploading a 4.1 MB model at once, 3 rounds, in one
sitting: +379 MB over idle with the dynamic threshold (fixed at
128 KiB, the previous default: +349..355 MB), +95..103 MB fixed at 64 KiB, +100 MB at 32 KiB.
Setting the threshold with mallopt at start-up does the same as the environment variable
MALLOC_MMAP_THRESHOLD_, which, when set, wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_ENV = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's M_MMAP_THRESHOLD at `threshold` bytes (0: leave it dynamic). True if set."""
    if threshold <= 0 or not sys.platform.startswith("linux") or _ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc; absent from musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    if done:
        log.debug("malloc: M_MMAP_THRESHOLD fixed at %d bytes", threshold)
    return done


def freeze_startup_objects() -> int:
    """Move every object alive now (torch's and the other imports', the run's setup) into the
    collector's permanent generation, so the cyclic GC's full collections stop walking them.

    Called once the coordinator is built, before it serves. A full collection walked ~177,000
    objects (88 ms) after the imports alone; under load (2,000 clients, 1,000 a round, ~2,200
    calls a round) the calls' short-lived objects set one or two off every round, 11% of the
    coordinator's CPU in gc_collect_main (py-spy). Frozen, alternated twice
    (benchmarks/load_clients.py): coordinator CPU per round 1.57 and 1.58 s, against 1.74 and
    1.67 s unfrozen. Frozen objects are never freed by the collector; what is frozen here
    lives for the whole run anyway. Returns how many were frozen.
    """
    gc.collect()  # whatever setup left as garbage goes now, not into the permanent generation
    gc.freeze()
    return gc.get_freeze_count()
