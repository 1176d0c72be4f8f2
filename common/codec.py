"""Tensor sets on the wire: encode, chunk, reassemble, verify (pure: no generated protobuf code).

A tensor set is an ordered list of named tensors. On the wire it is a header
(names, wire dtypes, shapes, total size, SHA-256) followed by chunks of the
payload: every tensor's raw little-endian bytes, concatenated in header order.

    digest = SHA-256(spec_text || payload),  spec_text = "name\\tdtype\\td0,d1,...\\n" per tensor

Floating-point tensors may travel as float16 or bfloat16 (the run's encoding) and
are decoded back to float32. Nothing is ever unpickled. The proto forms of headers and
chunks are in common/wire.py; the chunked streams of the RPCs in common/transfer.py.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FLOATING = ("float32", "float16", "bfloat16", "float64")
ENCODINGS = ("float32", "float16", "bfloat16")

_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,256}$")

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_TENSORS = 100_000


class TensorSetError(ValueError):
    """A tensor set that is malformed, inconsistent or corrupted (INVALID_ARGUMENT)."""


class TensorSetTooLarge(TensorSetError):
    """A tensor set over the size cap (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, wire dtype and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class TensorSetHeader:
    """What precedes a payload: specs in payload order, its size and its digest."""

    specs: tuple[TensorSpec, ...]
    total_bytes: int
    sha256: bytes
    encoding: str = "float32"


@dataclass(frozen=True)
class EncodedTensorSet:
    """A header and its payload (a read-only view; no copy of the tensors is implied)."""

    header: TensorSetHeader
    payload: memoryview
    # True when Reassembler.finish() already checked the digest, so decode() need not hash again.
    verified: bool = False


def check_name(name: str) -> None:
    """Fail unless name is 1-256 characters from [A-Za-z0-9_.:/-]."""
    if not _NAME.match(name):
        raise TensorSetError(f"tensor name {name!r} is not allowed (1-256 characters from [A-Za-z0-9_.:/-])")


def _check_host() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("fedmeta's tensor codec needs a little-endian host")


def spec_text(specs: Sequence[TensorSpec]) -> bytes:
    """Canonical text of the specs that the digest covers."""
    return "".join(
        f"{s.name}\t{s.dtype}\t{','.join(str(d) for d in s.shape)}\n" for s in specs
    ).encode()


def digest(specs: Sequence[TensorSpec], payload: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 over the spec text followed by the payload."""
    h = hashlib.sha256(spec_text(specs))
    h.update(payload)
    return h.digest()


def abs_max(t: torch.Tensor) -> float:
    """max |t|: NaN if t holds a NaN, inf if an infinity; 0 for an empty tensor.

    One min/max reduction, no temporary: ~20x faster than torch.isfinite(t).all().
    """
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    lo_f, hi_f = float(lo), float(hi)
    if math.isnan(lo_f) or math.isnan(hi_f):
        return math.nan
    return max(-lo_f, hi_f)


def _wire_dtype(dtype: torch.dtype, encoding: str) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise TensorSetError(f"unsupported tensor dtype: expected one of {sorted(DTYPES)}, got {dtype}")
    if name in _FLOATING and encoding != "float32":
        return encoding
    return name


def _flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view over tensors that already lie back to back in one storage, else None."""
    first = tensors[0]
    if first.device.type != "cpu":
        return None
    end = first.data_ptr()
    for t in tensors:
        if t.dtype != first.dtype or not t.is_contiguous() or t.data_ptr() != end:
            return None
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        end += t.numel() * t.element_size()
    total = sum(t.numel() for t in tensors)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,), (1,))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return t.detach().reshape(-1).view(torch.uint8).numpy().data


def encode(tensors: Mapping[str, torch.Tensor], *, encoding: str = "float32") -> EncodedTensorSet:
    """Encode named tensors into a header and a payload.

    Float32 tensors that already lie back to back in memory (a flat parameter
    buffer) are not copied: the payload is a view of their storage.
    """
    _check_host()
    if encoding not in ENCODINGS:
        raise TensorSetError(f"unknown encoding: expected one of {ENCODINGS}, got {encoding!r}")
    if len(tensors) > MAX_TENSORS:
        raise TensorSetTooLarge(f"tensor set has {len(tensors)} tensors; at most {MAX_TENSORS} are allowed")
    specs: list[TensorSpec] = []
    wire: list[torch.Tensor] = []
    for name, t in tensors.items():
        check_name(name)
        dtype = _wire_dtype(t.dtype, encoding)
        t = t.detach()
        if DTYPES[dtype] != t.dtype:
            converted = t.to(DTYPES[dtype])
            if dtype == "float16" and torch.finfo(torch.float16).max < abs_max(t) < math.inf:
                raise TensorSetError(f"tensor {name!r} has values beyond float16's range (65504): "
                                     "use the bfloat16 or float32 encoding")
            t = converted
        specs.append(TensorSpec(name, dtype, tuple(int(d) for d in t.shape)))
        wire.append(t)
    flat = _flat_view(wire) if wire else None
    if flat is not None:
        payload = _as_bytes(flat)
    else:
        buf = bytearray(sum(s.nbytes for s in specs))
        offset = 0
        for spec, t in zip(specs, wire):
            src = _as_bytes(t.cpu().contiguous())
            buf[offset : offset + spec.nbytes] = src
            offset += spec.nbytes
        payload = memoryview(buf)
    header = TensorSetHeader(tuple(specs), len(payload), digest(specs, payload), encoding)
    return EncodedTensorSet(header, payload.toreadonly())


def iter_chunks(payload: memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, bytes) slices of the payload of at most chunk_bytes each."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected a positive integer, got {chunk_bytes!r}")
    for offset in range(0, len(payload), chunk_bytes):
        yield offset, bytes(payload[offset : offset + chunk_bytes])


def check_specs(specs: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """Fail unless specs name exactly the expected tensors with the expected shapes.

    Dtypes may differ only by the floating-point transport encoding.
    """
    got = {s.name: s for s in specs}
    want = {s.name: s for s in expected}
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    if missing or extra:
        raise TensorSetError(f"tensor names do not match the model: missing {missing}, unexpected {extra}")
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape:
            raise TensorSetError(f"tensor {name!r}: expected shape {list(w.shape)}, got {list(g.shape)}")
        if (g.dtype in _FLOATING) != (w.dtype in _FLOATING):
            raise TensorSetError(f"tensor {name!r}: expected dtype {w.dtype}, got {g.dtype}")


class TensorSet(dict[str, torch.Tensor]):
    """decode()'s result: name -> tensor, and, when every tensor is float32 on the wire, `flat`:
    the one float32 vector they are consecutive views of (checks and sums then take one op over
    the whole update instead of one per tensor: ~0.6 ms less per update of a small MLP)."""

    flat: torch.Tensor | None = None


def decode(
    encoded: EncodedTensorSet,
    *,
    expected: Sequence[TensorSpec] | None = None,
    require_finite: bool = True,
) -> TensorSet:
    """Verify a payload against its header and return float32 (or integer) tensors.

    Checks the digest, the size, the names and shapes against ``expected`` (when
    given) and, with ``require_finite``, that no value is NaN or infinite.
    """
    _check_host()
    header = encoded.header
    if len(encoded.payload) != header.total_bytes:
        raise TensorSetError(f"payload has {len(encoded.payload)} bytes; the header says {header.total_bytes}")
    if not encoded.verified and digest(header.specs, encoded.payload) != header.sha256:
        raise TensorSetError("SHA-256 digest mismatch: the payload was corrupted or the header does not match it")
    if expected is not None:
        check_specs(header.specs, expected)
    buf = encoded.payload
    if header.specs and header.total_bytes and all(spec.dtype == "float32" for spec in header.specs):
        return _decode_flat(header, buf, require_finite)
    out = TensorSet()
    offset = 0
    for spec in header.specs:
        dtype = DTYPES[spec.dtype]
        if spec.numel:
            t = torch.frombuffer(buf, dtype=dtype, count=spec.numel, offset=offset).reshape(spec.shape)
        else:
            t = torch.empty(spec.shape, dtype=dtype)
        offset += spec.nbytes
        if spec.dtype in _FLOATING and dtype != torch.float32:
            t = t.to(torch.float32)
        if require_finite and t.is_floating_point() and not math.isfinite(abs_max(t)):
            raise TensorSetError(f"tensor {spec.name!r} contains NaN or infinite values")
        out[spec.name] = t
    return out


def _decode_flat(header: TensorSetHeader, buf: memoryview | bytes | bytearray, require_finite: bool) -> TensorSet:
    """Every tensor float32: views of one flat vector, checked for finiteness in one reduction."""
    flat = torch.frombuffer(buf, dtype=torch.float32, count=header.total_bytes // 4)
    out = TensorSet()
    offset = 0
    for spec in header.specs:
        out[spec.name] = flat[offset:offset + spec.numel].view(spec.shape)
        offset += spec.numel
    if require_finite and not math.isfinite(abs_max(flat)):
        bad = next(name for name, t in out.items() if not math.isfinite(abs_max(t)))
        raise TensorSetError(f"tensor {bad!r} contains NaN or infinite values")
    out.flat = flat
    return out


class Reassembler:
    """Collects a payload from ordered chunks for one header, enforcing the size cap.

    Memory is one buffer of the declared size, allocated after the cap check.
    """

    def __init__(self, header: TensorSetHeader, *, max_bytes: int) -> None:
        if header.total_bytes > max_bytes:
            raise TensorSetTooLarge(
                f"tensor set of {header.total_bytes} bytes is over the cap of {max_bytes} bytes"
            )
        self.header = header
        self._buf = bytearray(header.total_bytes)
        self._view = memoryview(self._buf)
        self._received = 0
        self._hash = hashlib.sha256(spec_text(header.specs))

    @property
    def received(self) -> int:
        return self._received

    def add(self, offset: int, data: bytes) -> None:
        if offset != self._received:
            raise TensorSetError(
                f"chunk at offset {offset} is out of order: expected offset {self._received}"
            )
        end = offset + len(data)
        if end > self.header.total_bytes:
            raise TensorSetError(
                f"chunk ending at byte {end} overruns the declared total of {self.header.total_bytes} bytes"
            )
        self._view[offset:end] = data
        self._hash.update(data)
        self._received = end

    def finish(self) -> EncodedTensorSet:
        if self._received != self.header.total_bytes:
            raise TensorSetError(
                f"stream ended after {self._received} of {self.header.total_bytes} payload bytes"
            )
        if self._hash.digest() != self.header.sha256:
            raise TensorSetError("SHA-256 digest mismatch: the payload was corrupted or the header does not match it")
        return EncodedTensorSet(self.header, self._view, verified=True)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """Float32-on-the-wire specs of a parameter dict (what updates must match)."""
    return tuple(TensorSpec(n, _wire_dtype(t.dtype, "float32"), tuple(t.shape)) for n, t in tensors.items())


def version_of(tensors: Mapping[str, torch.Tensor]) -> str:
    """Parameter version: hex SHA-256 of the float32 encoding."""
    return encode(tensors).header.sha256.hex()
