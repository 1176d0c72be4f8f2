"""Property-based tests: random and mutated tensor sets never crash the codec with anything but TensorSetError."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.common.codec import (
    Reassembler,
    TensorSetError,
    decode,
    encode,
    iter_chunks,
)
from fedmeta.common.proto import tensor_pb
from fedmeta.common.wire import header_from_proto, header_to_proto

shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3).map(tuple)
tensor_sets = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), shapes, min_size=1, max_size=4
).map(lambda d: {k: torch.randn(s) for k, s in d.items()})


@settings(max_examples=150, deadline=None)
@given(tensor_sets, st.sampled_from(["float32", "float16", "bfloat16"]), st.integers(min_value=1, max_value=64))
def test_round_trip_any_set(tensors: dict[str, torch.Tensor], encoding: str, chunk: int) -> None:
    enc = encode(tensors, encoding=encoding)
    header = header_from_proto(header_to_proto(enc.header))
    r = Reassembler(header, max_bytes=1 << 20)
    for offset, data in iter_chunks(enc.payload, chunk):
        r.add(offset, data)
    out = decode(r.finish())
    assert out.keys() == tensors.keys()
    for k, t in tensors.items():
        assert out[k].shape == t.shape
        if encoding == "float32":
            assert torch.equal(out[k], t)


@settings(max_examples=300, deadline=None)
@given(tensor_sets, st.data())
def test_mutated_payloads_and_chunk_sequences_fail_cleanly(tensors: dict[str, torch.Tensor], data: st.DataObject) -> None:
    enc = encode(tensors)
    payload = bytearray(enc.payload)
    chunks = [(o, bytes(d)) for o, d in iter_chunks(memoryview(payload), 7)]
    mutation = data.draw(st.sampled_from(["flip", "drop", "swap", "extra", "offset"]))
    if mutation == "flip" and payload:
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= 1 << data.draw(st.integers(0, 7))
        chunks = [(o, bytes(d)) for o, d in iter_chunks(memoryview(payload), 7)]
    elif mutation == "drop" and chunks:
        chunks.pop(data.draw(st.integers(0, len(chunks) - 1)))
    elif mutation == "swap" and len(chunks) > 1:
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    elif mutation == "extra":
        chunks.append((len(payload), data.draw(st.binary(min_size=1, max_size=16))))
    elif mutation == "offset" and chunks:
        o, d = chunks[0]
        chunks[0] = (o + data.draw(st.integers(1, 100)), d)
    else:
        return
    try:
        r = Reassembler(enc.header, max_bytes=1 << 20)
        for offset, chunk in chunks:
            r.add(offset, chunk)
        decode(r.finish())
    except TensorSetError:
        return
    # Only a bit flip that leaves the bytes equal could pass, and a flip always changes them.
    raise AssertionError(f"mutation {mutation!r} was not detected")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_header_bytes_parse_or_fail_cleanly(raw: bytes) -> None:
    try:
        msg = tensor_pb.TensorSetHeader.FromString(raw)
    except Exception:  # protobuf's DecodeError: malformed wire bytes never reach the codec
        return
    try:
        header = header_from_proto(msg)
    except TensorSetError:
        return
    assert header.total_bytes == sum(s.nbytes for s in header.specs)
