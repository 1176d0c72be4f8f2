"""Tensor codec throughput on a 43.6 MB float32 tensor set, against memcpy and SHA-256 on this machine.

The tensor set is the parameters of MLP 1-3300-3300-1 (10,903,201 float32 values, 6 tensors),
either as separate tensors (what a client step returns) or as views of one flat buffer (what
the coordinator broadcasts; the codec encodes float32 views zero-copy). For each layout and
each transport encoding (float32, float16, bfloat16) it times, in one thread:

  encode       fedmeta.common.codec.encode (cast to the wire dtype, gather into one payload, SHA-256)
  chunk        iter_chunks(payload, 1 MiB): the bytes objects that go into the chunk messages
  reassemble   Reassembler.add per chunk + finish (copy into one buffer, incremental SHA-256)
  decode       fedmeta.common.codec.decode (SHA-256 again, finiteness check, cast back to float32);
               also without the finiteness check (require_finite=False)
  round trip   all four, chained as the sender and the receiver run them

and reports the median of --reps repetitions as MB/s of the float32 size (43.6 MB) and of the
bytes on the wire. Baselines: bytearray copy, numpy copy, torch clone, hashlib.sha256 (one
call and 1 MiB updates), torch.isfinite().all(), float32 -> float16/bfloat16 casts.

    python benchmarks/codec_throughput.py
    python benchmarks/codec_throughput.py --reps 9 --hidden 3300
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import CpuMonitor, machine, wait_quiet, write_result  # noqa: E402
from fedmeta.common.aggregation import FlatLayout  # noqa: E402
from fedmeta.common.codec import DEFAULT_CHUNK_BYTES, ENCODINGS, Reassembler, decode, encode, iter_chunks, specs_of  # noqa: E402
from fedmeta.common.models import ModelSpec, init_parameters  # noqa: E402

NAME = "codec_throughput"
MB = 1e6


def timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    fn()  # warm-up: page faults of first-touch buffers, lazy imports
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def rate(t: dict[str, float], nbytes: int) -> dict[str, float]:
    return {**{k: round(v, 5) for k, v in t.items()}, "mb_per_s": round(nbytes / t["median_s"] / MB, 1)}


def codec_case(tensors: dict[str, torch.Tensor], encoding: str, chunk_bytes: int, reps: int, nbytes: int) -> dict[str, Any]:
    specs = specs_of(tensors)
    enc = encode(tensors, encoding=encoding)
    wire = enc.header.total_bytes
    chunks = list(iter_chunks(enc.payload, chunk_bytes))

    def do_chunk() -> None:
        for _ in iter_chunks(enc.payload, chunk_bytes):
            pass

    def do_reassemble() -> Any:
        r = Reassembler(enc.header, max_bytes=1 << 31)
        for offset, data in chunks:
            r.add(offset, data)
        return r.finish()

    received = do_reassemble()

    def do_roundtrip() -> None:
        e = encode(tensors, encoding=encoding)
        r = Reassembler(e.header, max_bytes=1 << 31)
        for offset, data in iter_chunks(e.payload, chunk_bytes):
            r.add(offset, data)
        decode(r.finish(), expected=specs)

    out = {
        "wire_mb": wire / MB,
        "zero_copy_payload": not isinstance(enc.payload.obj, bytearray),
        "encode": rate(timed(lambda: encode(tensors, encoding=encoding), reps), nbytes),
        "chunk": rate(timed(do_chunk, reps), nbytes),
        "reassemble": rate(timed(do_reassemble, reps), nbytes),
        "decode": rate(timed(lambda: decode(received, expected=specs), reps), nbytes),
        "decode_no_finite_check": rate(timed(lambda: decode(received, expected=specs, require_finite=False), reps),
                                       nbytes),
        "round_trip": rate(timed(do_roundtrip, reps), nbytes),
    }
    out["round_trip"]["wire_mb_per_s"] = round(wire / out["round_trip"]["median_s"] / MB, 1)
    return out


def baselines(flat: torch.Tensor, reps: int) -> dict[str, Any]:
    nbytes = flat.numel() * 4
    mv = memoryview(flat.numpy()).cast("B")
    arr = flat.numpy()
    raw = bytes(mv)
    half = flat.to(torch.float16)

    def sha_chunks() -> bytes:
        h = hashlib.sha256()
        for off in range(0, nbytes, DEFAULT_CHUNK_BYTES):
            h.update(mv[off : off + DEFAULT_CHUNK_BYTES])
        return h.digest()

    return {
        "bytearray_copy": rate(timed(lambda: bytearray(mv), reps), nbytes),
        "bytes_copy": rate(timed(lambda: bytes(mv), reps), nbytes),
        "numpy_copy": rate(timed(lambda: np.copy(arr), reps), nbytes),
        "torch_clone": rate(timed(lambda: flat.clone(), reps), nbytes),
        "sha256_one_call": rate(timed(lambda: hashlib.sha256(raw).digest(), reps), nbytes),
        "sha256_1mib_updates": rate(timed(sha_chunks, reps), nbytes),
        "torch_isfinite_all": rate(timed(lambda: bool(torch.isfinite(flat).all()), reps), nbytes),
        "cast_float32_to_float16": rate(timed(lambda: flat.to(torch.float16), reps), nbytes),
        "cast_float32_to_bfloat16": rate(timed(lambda: flat.to(torch.bfloat16), reps), nbytes),
        "cast_float16_to_float32": rate(timed(lambda: half.to(torch.float32), reps), nbytes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=3300, help="MLP width H of 1-H-H-1 (default: 3300 -> 43.6 MB)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per measurement; the median is reported")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="chunk size (default: 1 MiB)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a client uses)")
    parser.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    quiet = None if args.no_wait_quiet else wait_quiet()
    monitor = CpuMonitor()

    spec = ModelSpec("mlp", {"in_features": 1, "hidden": [args.hidden, args.hidden], "out_features": 1})
    separate = init_parameters(spec, 0)
    layout = FlatLayout.of(separate)
    flat = layout.flatten(separate)
    views = layout.views(flat)
    nbytes = layout.numel * 4
    print(f"tensor set: {len(separate)} tensors, {layout.numel:,} float32 values, {nbytes / MB:.1f} MB; "
          f"{args.reps} reps, median; torch threads {torch.get_num_threads()}", flush=True)

    base = baselines(flat, args.reps)
    for k, v in base.items():
        print(f"  baseline {k:<26} {v['mb_per_s']:>8.0f} MB/s  ({1e3 * v['median_s']:.1f} ms)", flush=True)
    cases: dict[str, Any] = {}
    for layout_name, tensors in (("separate", separate), ("flat_views", views)):
        for encoding in ENCODINGS:
            key = f"{layout_name}/{encoding}"
            cases[key] = c = codec_case(tensors, encoding, args.chunk_bytes, args.reps, nbytes)
            print(f"  {key:<22} wire {c['wire_mb']:.1f} MB{' zero-copy' if c['zero_copy_payload'] else ''}: "
                  + ", ".join(f"{step} {c[step]['mb_per_s']:.0f} MB/s ({1e3 * c[step]['median_s']:.0f} ms)"
                              for step in ("encode", "chunk", "reassemble", "decode", "round_trip")), flush=True)
    result = {
        "settings": {"hidden": args.hidden, "parameters": layout.numel, "float32_mb": nbytes / MB,
                     "tensors": len(separate), "reps": args.reps, "statistic": "median",
                     "chunk_bytes": args.chunk_bytes, "torch_threads": torch.get_num_threads(),
                     "mb": "1e6 bytes of the float32 size per second unless wire_mb_per_s"},
        "baselines": base,
        "codec": cases,
        "cpu": monitor.stop(),
        "quiet_check": quiet,
        "machine": info,
    }
    path = write_result(NAME, result)
    cpu = result["cpu"]
    print(f"machine: {cpu['foreign_cpu_s']:.1f} CPU-s used by other processes during the benchmark "
          f"({100 * cpu['foreign_share_of_capacity']:.0f}% of capacity)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
