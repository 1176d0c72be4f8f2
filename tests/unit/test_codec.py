"""The tensor codec: encode, chunk, reassemble, verify, decode, and the header's proto form."""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import pytest
import torch

from fedmeta.common import codec
from fedmeta.common.aggregation import FlatLayout
from fedmeta.common.codec import (
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    ENCODINGS,
    EncodedTensorSet,
    Reassembler,
    TensorSetError,
    TensorSetTooLarge,
    decode,
    encode,
    iter_chunks,
    specs_of,
    version_of,
)
from fedmeta.common.proto import tensor_pb
from fedmeta.common.wire import encoding_from_proto, encoding_to_proto, header_from_proto, header_to_proto

# decode() of encode()'s own (read-only) payload makes torch warn that it cannot mark tensors
# read-only; receivers decode a Reassembler's writable buffer, so the warning is test noise.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

FLOATING = {"float32", "float16", "bfloat16", "float64"}
# Largest relative rounding error of one conversion to each encoding (half an ulp), with
# headroom, and an absolute floor for values that land in the subnormal range.
TOLERANCE = {"float32": (0.0, 0.0), "float16": (2**-10, 1e-4), "bfloat16": (2**-7, 1e-6)}
SHAPES = {"scalar": (), "empty": (0,), "empty3d": (3, 0, 2), "vector": (7,), "matrix": (4, 5), "cube": (2, 3, 4)}


def make_tensor(dtype_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    if dtype_name in FLOATING:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if dtype_name == "uint8":
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(dtype)
    info = torch.iinfo(dtype)
    # Extreme values as well as small ones: integers must travel bit for bit.
    t = torch.randint(-1000, 1000, shape, generator=gen, dtype=torch.int64).to(dtype)
    if t.numel() >= 2:
        t.view(-1)[0] = info.min
        t.view(-1)[1] = info.max
    return t


def tensor_set(dtype_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {f"layer.{name}": make_tensor(dtype_name, shape, seed + i) for i, (name, shape) in enumerate(SHAPES.items())}


def transmit(encoded: EncodedTensorSet, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_bytes: int = 1 << 30) -> EncodedTensorSet:
    """What a receiver gets: the header through its proto form, the payload through chunks."""
    header = header_from_proto(tensor_pb.TensorSetHeader.FromString(header_to_proto(encoded.header).SerializeToString()))
    assembler = Reassembler(header, max_bytes=max_bytes)
    for offset, data in iter_chunks(encoded.payload, chunk_bytes):
        assembler.add(offset, data)
    return assembler.finish()


def assert_round_trip(src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], encoding: str) -> None:
    assert list(out) == list(src)
    for name, s in src.items():
        o = out[name]
        assert o.shape == s.shape, name
        if s.is_floating_point():
            assert o.dtype == torch.float32, name
            wire = s.to(DTYPES[encoding]) if encoding != "float32" else s
            # Exactly the value the wire dtype holds, and close to the source.
            assert torch.equal(o, wire.to(torch.float32)), name
            rtol, atol = TOLERANCE[encoding]
            if s.dtype in (torch.float16, torch.bfloat16) and encoding != "float32" and s.dtype != DTYPES[encoding]:
                rtol, atol = max(rtol, 2**-7), max(atol, 1e-4)  # two roundings: source dtype, then the encoding
            torch.testing.assert_close(o, s.to(torch.float32), rtol=rtol, atol=atol, msg=name)
        else:
            assert o.dtype == s.dtype, name
            assert torch.equal(o, s), name


@pytest.mark.parametrize("chunk_bytes", [3, DEFAULT_CHUNK_BYTES])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_every_dtype_and_encoding(dtype_name: str, encoding: str, chunk_bytes: int) -> None:
    src = tensor_set(dtype_name)
    encoded = encode(src, encoding=encoding)
    expected_wire = encoding if dtype_name in FLOATING and encoding != "float32" else dtype_name
    assert [s.dtype for s in encoded.header.specs] == [expected_wire] * len(src)
    assert [s.shape for s in encoded.header.specs] == [tuple(t.shape) for t in src.values()]
    assert encoded.header.encoding == encoding
    assert encoded.header.total_bytes == sum(s.nbytes for s in encoded.header.specs) == len(encoded.payload)
    out = decode(transmit(encoded, chunk_bytes))
    assert_round_trip(src, out, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_mixed_dtypes_at_odd_offsets(encoding: str) -> None:
    # A 3-byte uint8 tensor first puts every later tensor at an unaligned payload offset.
    src = {
        "mask": torch.tensor([1, 0, 255], dtype=torch.uint8),
        "w": make_tensor("float32", (5, 3), 1),
        "h": make_tensor("float16", (4,), 2),
        "b": make_tensor("bfloat16", (2, 2), 3),
        "d": make_tensor("float64", (3,), 4),
        "step": torch.tensor(7, dtype=torch.int64),
        "idx": make_tensor("int32", (6,), 5),
    }
    out = decode(transmit(encode(src, encoding=encoding), chunk_bytes=5))
    assert_round_trip(src, out, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_of_only_zero_size_tensors(encoding: str) -> None:
    src = {"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.int64)}
    encoded = encode(src, encoding=encoding)
    assert encoded.header.total_bytes == 0
    assert list(iter_chunks(encoded.payload)) == []
    out = decode(transmit(encoded))
    assert out["a"].shape == (0,) and out["a"].dtype == torch.float32
    assert out["b"].shape == (2, 0) and out["b"].dtype == torch.int64


@pytest.mark.parametrize("contiguous_source", [True, False], ids=["flat-buffer", "separate-tensors"])
def test_set_over_4_mib_is_chunked_at_1_mib(contiguous_source: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (512, 1024), "b": (1024, 512), "c": (512, 1024), "d": (97,)}  # 6 MiB + 388 B of float32
    if contiguous_source:
        layout = FlatLayout([codec.TensorSpec(n, "float32", s) for n, s in shapes.items()])
        src = layout.views(torch.randn(layout.numel, generator=gen))
    else:
        src = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    encoded = encode(src)
    total = encoded.header.total_bytes
    assert total == 6 * 2**20 + 97 * 4
    chunks = list(iter_chunks(encoded.payload))
    assert len(chunks) == math.ceil(total / DEFAULT_CHUNK_BYTES) > 4
    assert all(len(data) <= DEFAULT_CHUNK_BYTES for _, data in chunks)
    assert [offset for offset, _ in chunks] == [i * DEFAULT_CHUNK_BYTES for i in range(len(chunks))]
    out = decode(transmit(encoded))
    for name, t in src.items():
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_non_contiguous_tensors_travel_in_logical_order(encoding: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src = {"transposed": base.t(), "strided": base[:, ::2], "expanded": torch.tensor([1.5]).expand(3, 4),
           "column": base[:, 1]}
    assert not any(t.is_contiguous() for t in src.values())
    out = decode(transmit(encode(src, encoding=encoding), chunk_bytes=10))
    for name, t in src.items():
        assert torch.equal(out[name], t), name  # small integers are exact in every encoding


def test_too_many_tensors_are_too_large() -> None:
    tensors = {f"t{i}": torch.empty(0) for i in range(codec.MAX_TENSORS + 1)}
    with pytest.raises(TensorSetTooLarge, match=str(codec.MAX_TENSORS)):
        encode(tensors)


@pytest.mark.parametrize("chunk_bytes", [0, -1])
def test_iter_chunks_rejects_non_positive_chunk_size(chunk_bytes: int) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(iter_chunks(memoryview(b"abc"), chunk_bytes))


# ---- the zero-copy path -------------------------------------------------------------------


def flat_params(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    specs = [codec.TensorSpec("net.0.weight", "float32", (8, 1)), codec.TensorSpec("net.0.bias", "float32", (8,)),
             codec.TensorSpec("net.2.weight", "float32", (1, 8)), codec.TensorSpec("net.2.bias", "float32", (1,)),
             codec.TensorSpec("scale", "float32", ())]
    layout = FlatLayout(specs)
    flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(seed))
    return flat, layout.views(flat)


def payload_address(encoded: EncodedTensorSet) -> int:
    return int(np.frombuffer(encoded.payload, dtype=np.uint8).__array_interface__["data"][0])


def test_views_of_one_flat_buffer_encode_without_copy() -> None:
    flat, views = flat_params()
    expected = {k: v.clone() for k, v in views.items()}
    encoded = encode(views)
    assert payload_address(encoded) == flat.data_ptr()
    assert encoded.payload.readonly
    assert decode(encoded).keys() == expected.keys()
    for name, t in decode(encoded).items():
        assert torch.equal(t, expected[name]), name
    # The payload is the buffer: writing the buffer changes the payload bytes.
    flat[0] = 42.0
    assert bytes(encoded.payload[:4]) == struct.pack("<f", 42.0)


def test_views_round_trip_through_chunks() -> None:
    flat, views = flat_params(1)
    out = decode(transmit(encode(views), chunk_bytes=7))
    for name, t in views.items():
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize(
    "case",
    ["reordered", "separate", "float16-encoding", "with-gap"],
)
def test_tensors_not_back_to_back_are_copied(case: str) -> None:
    flat, views = flat_params(2)
    encoding = "float32"
    if case == "reordered":
        src = dict(reversed(list(views.items())))
    elif case == "separate":
        src = {k: v.clone() for k, v in views.items()}
    elif case == "float16-encoding":
        src, encoding = views, "float16"
    else:
        src = {k: v for k, v in views.items() if k != "net.0.bias"}
    expected = {k: v.clone() for k, v in src.items()}
    encoded = encode(src, encoding=encoding)
    assert payload_address(encoded) != flat.data_ptr()
    before = bytes(encoded.payload)
    flat.add_(1.0)
    assert bytes(encoded.payload) == before
    out = decode(encoded)
    assert_round_trip(expected, out, encoding)


# ---- corrupted and malformed streams ------------------------------------------------------


@pytest.fixture
def encoded() -> EncodedTensorSet:
    gen = torch.Generator().manual_seed(3)
    return encode({"w": torch.randn(40, 10, generator=gen), "b": torch.randn(40, generator=gen)})


CHUNK = 256


def chunks_of(encoded: EncodedTensorSet) -> list[tuple[int, bytes]]:
    chunks = list(iter_chunks(encoded.payload, CHUNK))
    assert len(chunks) >= 3
    return chunks


def test_flipped_byte_in_a_chunk_fails_the_digest(encoded: EncodedTensorSet) -> None:
    chunks = chunks_of(encoded)
    offset, data = chunks[1]
    chunks[1] = (offset, data[:10] + bytes([data[10] ^ 0x01]) + data[11:])
    assembler = Reassembler(encoded.header, max_bytes=1 << 20)
    for offset, data in chunks:
        assembler.add(offset, data)
    with pytest.raises(TensorSetError, match="digest"):
        assembler.finish()


def test_wrong_digest_in_header_is_rejected(encoded: EncodedTensorSet) -> None:
    header = dataclasses.replace(encoded.header, sha256=bytes(32))
    assembler = Reassembler(header, max_bytes=1 << 20)
    for offset, data in chunks_of(encoded):
        assembler.add(offset, data)
    with pytest.raises(TensorSetError, match="digest"):
        assembler.finish()
    with pytest.raises(TensorSetError, match="digest"):
        decode(EncodedTensorSet(header, encoded.payload))


def test_header_that_does_not_match_the_payload_fails_the_digest(encoded: EncodedTensorSet) -> None:
    # Same bytes, different shapes: the digest covers the specs, not only the payload.
    specs = (codec.TensorSpec("w", "float32", (10, 40)), encoded.header.specs[1])
    header = dataclasses.replace(encoded.header, specs=specs)
    with pytest.raises(TensorSetError, match="digest"):
        decode(EncodedTensorSet(header, encoded.payload))


def test_chunks_out_of_order_are_rejected(encoded: EncodedTensorSet) -> None:
    chunks = chunks_of(encoded)
    assembler = Reassembler(encoded.header, max_bytes=1 << 20)
    assembler.add(*chunks[0])
    with pytest.raises(TensorSetError, match="out of order"):
        assembler.add(*chunks[2])


def test_repeated_chunk_is_rejected(encoded: EncodedTensorSet) -> None:
    chunks = chunks_of(encoded)
    assembler = Reassembler(encoded.header, max_bytes=1 << 20)
    assembler.add(*chunks[0])
    with pytest.raises(TensorSetError, match="out of order"):
        assembler.add(*chunks[0])


def test_chunk_overrunning_total_bytes_is_rejected(encoded: EncodedTensorSet) -> None:
    assembler = Reassembler(encoded.header, max_bytes=1 << 20)
    with pytest.raises(TensorSetError, match="overruns"):
        assembler.add(0, bytes(encoded.payload) + b"\x00")
    assert assembler.received == 0


def test_stream_ending_early_is_rejected(encoded: EncodedTensorSet) -> None:
    chunks = chunks_of(encoded)
    assembler = Reassembler(encoded.header, max_bytes=1 << 20)
    for chunk in chunks[:-1]:
        assembler.add(*chunk)
    assert assembler.received == encoded.header.total_bytes - len(chunks[-1][1])
    with pytest.raises(TensorSetError, match="stream ended"):
        assembler.finish()


def test_header_over_the_cap_is_too_large(encoded: EncodedTensorSet) -> None:
    assert issubclass(TensorSetTooLarge, TensorSetError)
    total = encoded.header.total_bytes
    with pytest.raises(TensorSetTooLarge, match=str(total)):
        Reassembler(encoded.header, max_bytes=total - 1)
    Reassembler(encoded.header, max_bytes=total)  # exactly at the cap is allowed


def test_payload_of_the_wrong_size_is_rejected(encoded: EncodedTensorSet) -> None:
    with pytest.raises(TensorSetError, match="bytes"):
        decode(EncodedTensorSet(encoded.header, memoryview(bytes(encoded.payload)[:-4])))


@pytest.mark.parametrize("name", ["", "has space", "tab\tname", "new\nline", "x" * 257, "naïve"])
def test_encode_rejects_bad_names(name: str) -> None:
    with pytest.raises(TensorSetError, match="not allowed"):
        encode({name: torch.zeros(1)})


def test_encode_rejects_unknown_encoding_and_dtype() -> None:
    with pytest.raises(TensorSetError, match="encoding"):
        encode({"w": torch.zeros(1)}, encoding="int8")
    with pytest.raises(TensorSetError, match="dtype"):
        encode({"w": torch.zeros(1, dtype=torch.complex64)})


# ---- decode against the expected specs ------------------------------------------------------


PARAMS = {"net.0.weight": torch.ones(4, 1), "net.0.bias": torch.zeros(4), "net.2.weight": torch.ones(1, 4)}


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({k: v for k, v in PARAMS.items() if k != "net.0.bias"}, "net.0.bias"),
        ({**PARAMS, "extra.weight": torch.ones(2)}, "extra.weight"),
        ({**PARAMS, "net.2.weight": torch.ones(4, 1)}, "net.2.weight"),
        ({**PARAMS, "net.0.bias": torch.zeros(4, dtype=torch.int64)}, "net.0.bias"),
    ],
    ids=["missing", "extra", "wrong-shape", "integer-for-float"],
)
def test_decode_checks_expected_specs(tensors: dict[str, torch.Tensor], named: str) -> None:
    with pytest.raises(TensorSetError, match=named.replace(".", r"\.")):
        decode(encode(tensors), expected=specs_of(PARAMS))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decode_accepts_matching_specs_in_any_encoding(encoding: str) -> None:
    out = decode(encode(PARAMS, encoding=encoding), expected=specs_of(PARAMS))
    for name, t in PARAMS.items():
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_non_finite_values_are_rejected(bad: float, encoding: str) -> None:
    w = torch.ones(3, 3)
    w[1, 2] = bad
    with pytest.raises(TensorSetError, match="'net.0.weight'.*NaN or infinite"):
        decode(encode({"net.0.bias": torch.zeros(3), "net.0.weight": w}, encoding=encoding))


def test_require_finite_false_lets_nan_through() -> None:
    w = torch.tensor([1.0, float("nan"), float("inf")])
    out = decode(encode({"w": w}), require_finite=False)
    assert out["w"][0] == 1.0 and math.isnan(out["w"][1]) and math.isinf(out["w"][2])


# ---- the header's proto form ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_header_proto_round_trip(encoding: str) -> None:
    src = {"a": torch.randn(2, 3), "s": torch.tensor(1.0), "e": torch.empty(0, 5), "i": torch.arange(4), "u": torch.ones(3, dtype=torch.uint8)}
    header = encode(src, encoding=encoding).header
    wire = header_to_proto(header).SerializeToString()
    assert header_from_proto(tensor_pb.TensorSetHeader.FromString(wire)) == header


def valid_header_proto() -> tensor_pb.TensorSetHeader:
    header = encode({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int32)}).header
    msg = tensor_pb.TensorSetHeader()
    msg.CopyFrom(header_to_proto(header))
    return msg


def _unknown_dtype(msg: tensor_pb.TensorSetHeader) -> None:
    msg.tensors[1].dtype = 99


def _unspecified_dtype(msg: tensor_pb.TensorSetHeader) -> None:
    msg.tensors[1].dtype = tensor_pb.DTYPE_UNSPECIFIED


def _negative_dim(msg: tensor_pb.TensorSetHeader) -> None:
    del msg.tensors[0].shape[:]
    msg.tensors[0].shape.extend([-2, -3])


def _too_many_dims(msg: tensor_pb.TensorSetHeader) -> None:
    del msg.tensors[0].shape[:]
    msg.tensors[0].shape.extend([1] * 17 + [6])


def _duplicate(msg: tensor_pb.TensorSetHeader) -> None:
    msg.tensors.add().CopyFrom(msg.tensors[1])
    msg.total_bytes += 16


def _bad_name(name: str):  # type: ignore[no-untyped-def]
    def mutate(msg: tensor_pb.TensorSetHeader) -> None:
        msg.tensors[0].name = name

    return mutate


def _total(delta: int):  # type: ignore[no-untyped-def]
    def mutate(msg: tensor_pb.TensorSetHeader) -> None:
        msg.total_bytes += delta

    return mutate


def _sha(n: int):  # type: ignore[no-untyped-def]
    def mutate(msg: tensor_pb.TensorSetHeader) -> None:
        msg.sha256 = bytes(n)

    return mutate


def _encoding(value: int):  # type: ignore[no-untyped-def]
    def mutate(msg: tensor_pb.TensorSetHeader) -> None:
        msg.encoding = value  # type: ignore[assignment]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_unknown_dtype, "'b': unknown dtype 99"),
        (_unspecified_dtype, "'b': unknown dtype 0"),
        (_negative_dim, "'a': invalid shape"),
        (_too_many_dims, "'a': invalid shape"),
        (_duplicate, "'b' appears twice"),
        (_bad_name(""), "not allowed"),
        (_bad_name("a b"), "not allowed"),
        (_bad_name("x" * 257), "not allowed"),
        (_total(1), "declares"),
        (_total(-1), "declares"),
        (_sha(31), "sha256 must be 32 bytes"),
        (_sha(33), "sha256 must be 32 bytes"),
        (_sha(0), "sha256 must be 32 bytes"),
        (_encoding(tensor_pb.ENCODING_UNSPECIFIED), "unknown tensor encoding"),
        (_encoding(42), "unknown tensor encoding"),
    ],
    ids=["dtype-99", "dtype-unspecified", "negative-dim", "17-dims", "duplicate-name", "empty-name", "space-in-name",
         "long-name", "total-plus-1", "total-minus-1", "sha-31", "sha-33", "sha-empty", "encoding-unspecified",
         "encoding-42"],
)
def test_header_from_proto_rejects(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    msg = valid_header_proto()
    header_from_proto(msg)  # the unmutated header is valid
    mutate(msg)
    with pytest.raises(TensorSetError, match=message.replace("(", r"\(")):
        header_from_proto(msg)


def test_encoding_proto_conversions() -> None:
    for encoding in ENCODINGS:
        assert encoding_from_proto(encoding_to_proto(encoding)) == encoding
    with pytest.raises(TensorSetError, match="unknown tensor encoding"):
        encoding_from_proto(tensor_pb.ENCODING_UNSPECIFIED)


# ---- parameter versions ---------------------------------------------------------------------


def version_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return {"net.0.weight": torch.randn(4, 3, generator=gen), "net.0.bias": torch.randn(4, generator=gen),
            "scale": torch.tensor(0.5)}


def test_version_is_deterministic() -> None:
    params = version_params()
    v = version_of(params)
    assert len(v) == 64 and int(v, 16) >= 0
    assert version_of(params) == v
    assert version_of({k: t.clone() for k, t in params.items()}) == v
    assert version_of(version_params()) == v


@pytest.mark.parametrize(("name", "index"), [("net.0.weight", 0), ("net.0.weight", 11), ("net.0.bias", 2), ("scale", 0)])
def test_version_changes_when_any_value_changes(name: str, index: int) -> None:
    params = version_params()
    before = version_of(params)
    flat = params[name].view(-1)
    flat[index] = torch.nextafter(flat[index], torch.tensor(math.inf))  # the smallest possible change
    assert version_of(params) != before


def test_version_changes_with_names_and_shapes() -> None:
    params = version_params()
    before = version_of(params)
    renamed = {("net.1.bias" if k == "net.0.bias" else k): v for k, v in params.items()}
    reshaped = {**params, "net.0.weight": params["net.0.weight"].reshape(3, 4)}
    assert len({before, version_of(renamed), version_of(reshaped)}) == 3


def test_float16_overflow_is_refused_at_encode_time() -> None:
    with pytest.raises(TensorSetError, match="float16"):
        encode({"w": torch.tensor([1.0, 1e6])}, encoding="float16")
    # bfloat16 has float32's range, so the same tensor encodes and round-trips approximately.
    out = decode(encode({"w": torch.tensor([1.0, 1e6])}, encoding="bfloat16"))
    assert torch.allclose(out["w"], torch.tensor([1.0, 1e6]), rtol=1e-2)
