"""Codecs: round-trip within the stated error, exact wire layout, and refusal of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.node import GossamerError
from gossamer.training import get_codec
from gossamer.training.codecs import (
    BLOCK,
    CODEC_NAMES,
    CodecError,
    EncodedTensor,
    ErrorFeedback,
    max_abs_error_bound,
)

torch.set_num_threads(1)

# Largest |x| each codec can encode (fp16 range, or fp16 scale range × qmax).
LIMIT = {"none": 3e38, "fp16": 65504.0, "bf16": 3e38, "int8": 65504.0 * 127, "int4": 65504.0 * 7}


def _roundtrip_ok(name: str, x: torch.Tensor) -> None:
    codec = get_codec(name)
    enc = codec.encode(x)
    out = codec.decode(enc)
    assert out.dtype == torch.float32
    assert out.shape == x.shape
    err = (out.double() - x.double()).abs()
    bound = max_abs_error_bound(name, x).double()
    assert bool((err <= bound).all()), f"{name}: error {float((err - bound).max())} over bound"
    assert enc.nbytes == sum(codec.buffer_sizes(x.numel()))


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize(
    "shape", [(0,), (3, 0), (), (1,), (2,), (3,), (255,), (256,), (257,), (511,), (7, 73), (4, 256)]
)
def test_roundtrip_within_bound_for_odd_sizes(name: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    _roundtrip_ok(name, torch.randn(shape, generator=g) * 3)


@pytest.mark.parametrize("name", CODEC_NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_roundtrip_within_bound_hypothesis(name: str, data: st.DataObject) -> None:
    limit = float(np.float32(min(LIMIT[name], 1e30)))  # hypothesis wants exact fp32 bounds
    values = data.draw(
        st.lists(
            st.floats(min_value=-limit, max_value=limit, width=32, allow_subnormal=True),
            max_size=600,
        )
    )
    _roundtrip_ok(name, torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("name", ["int8", "int4"])
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 1500),
    log_scale=st.floats(-30, 5),
    seed=st.integers(0, 2**31),
)
def test_blockwise_roundtrip_across_magnitudes(
    name: str, n: int, log_scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    _roundtrip_ok(name, torch.randn(n, generator=g) * 10.0**log_scale)


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
def test_blockwise_bound_is_tight_and_matches_the_stated_formula(name: str, qmax: int) -> None:
    # The stated error is absmax_block/qmax/2 (up to fp16 rounding of the scale): check that the
    # bound really is that, and that the codec actually uses most of it (not a vacuous bound).
    x = torch.randn(4 * BLOCK, generator=torch.Generator().manual_seed(1))
    absmax = x.view(4, BLOCK).abs().amax(dim=1).repeat_interleave(BLOCK)
    bound = max_abs_error_bound(name, x)
    assert bool((bound <= absmax / qmax / 2 * (1 + 2**-9)).all())
    assert bool((bound >= absmax / qmax / 2).all())
    codec = get_codec(name)
    err = (codec.decode(codec.encode(x)) - x).abs()
    assert float(err.max()) > 0.9 * float(bound.max())


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_all_zero_blocks_decode_to_exact_zeros(name: str) -> None:
    x = torch.zeros(3 * BLOCK + 5)
    x[BLOCK * 2 : BLOCK * 2 + 10] = torch.linspace(-1, 1, 10)
    codec = get_codec(name)
    out = codec.decode(codec.encode(x))
    assert torch.equal(out[: 2 * BLOCK], torch.zeros(2 * BLOCK))
    assert torch.equal(out[3 * BLOCK :], torch.zeros(5))


@pytest.mark.parametrize(
    "name,ok,too_big",
    [("fp16", 6e4, 7e4), ("int8", 8e6, 9e6), ("int4", 4.5e5, 5e5), ("bf16", 1e38, None)],
)
def test_large_values_encode_or_refuse(name: str, ok: float, too_big: float | None) -> None:
    codec = get_codec(name)
    x = torch.tensor([ok, -ok / 3, 1.0, 0.0])
    _roundtrip_ok(name, x)
    if too_big is not None:
        with pytest.raises(CodecError, match="range"):
            codec.encode(torch.tensor([too_big, 1.0]))


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite(name: str, bad: float) -> None:
    x = torch.randn(700)
    x[600] = bad
    with pytest.raises(CodecError, match="non-finite"):
        get_codec(name).encode(x)


def test_encode_refuses_integer_tensors_and_unknown_codecs() -> None:
    with pytest.raises(CodecError):
        get_codec("int8").encode(torch.arange(10))
    with pytest.raises(CodecError, match="unknown codec"):
        get_codec("int3")
    assert get_codec("fp32") is get_codec("none")


def test_int4_wire_layout_is_low_nibble_first() -> None:
    # absmax 7 -> scale exactly 1.0, so codes are the values themselves, stored as code + 8.
    x = torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0])
    enc = get_codec("int4").encode(x)
    packed, scales = enc.buffers
    assert packed.tolist() == [(1 << 4) | 15, (11 << 4) | 8, (8 << 4) | 7]
    assert scales.view(torch.float16).tolist() == [1.0]
    assert torch.equal(get_codec("int4").decode(enc), x)


def test_int8_wire_layout() -> None:
    x = torch.tensor([127.0, -127.0, 0.0, 5.0])
    codes, scales = get_codec("int8").encode(x).buffers
    assert codes.view(torch.int8).tolist() == [127, -127, 0, 5]
    assert scales.view(torch.float16).tolist() == [1.0]


def test_scale_is_rounded_up_so_nothing_clips() -> None:
    # absmax/127 is not an fp16 value: rounding it to nearest could go down and clip the max.
    x = torch.full((BLOCK,), 0.1)
    x[0] = 1.0001
    codec = get_codec("int8")
    _, scales = codec.encode(x).buffers
    s = float(scales.view(torch.float16)[0])
    assert s >= 1.0001 / 127
    _roundtrip_ok("int8", x)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_fp32_subnormals_are_not_lost(name: str) -> None:
    # absmax/127 underflows to 0 in fp32 for a subnormal block; the scale must still be > 0.
    x = torch.zeros(2 * BLOCK + 1)
    x[0] = 1.401298464324817e-45  # the smallest fp32 subnormal, alone in its block
    x[BLOCK] = -3e-42
    _roundtrip_ok(name, x)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encoding_is_deterministic_and_buffers_are_flat_uint8(name: str) -> None:
    x = torch.randn(3, 333, generator=torch.Generator().manual_seed(5))
    a, b = get_codec(name).encode(x), get_codec(name).encode(x.clone())
    assert len(a.buffers) == (1 if name in ("none", "fp16", "bf16") else 2)
    for ba, bb in zip(a.buffers, b.buffers, strict=True):
        assert ba.dtype == torch.uint8 and ba.dim() == 1 and ba.is_contiguous()
        assert torch.equal(ba, bb)


def test_none_codec_is_zero_copy() -> None:
    x = torch.randn(1000)
    (buf,) = get_codec("none").encode(x).buffers
    assert buf.data_ptr() == x.data_ptr()
    mv = memoryview(buf.numpy())  # what the data plane hands to the socket
    assert mv.nbytes == 4000


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_wire_roundtrip_through_header_and_bytes(name: str) -> None:
    x = torch.randn(5, 77, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    codec = get_codec(name)
    enc = codec.encode(x)
    header = enc.header()
    assert header["dtype"] == "bfloat16" and header["shape"] == [5, 77]
    as_bytes = [bytes(memoryview(b.numpy())) for b in enc.buffers]
    as_numpy = [b.numpy().copy() for b in enc.buffers]
    for bufs in (as_bytes, as_numpy, [bytearray(b) for b in as_bytes]):
        got = codec.decode(EncodedTensor.from_header(header, bufs), expected_shape=(5, 77))
        assert torch.equal(got, codec.decode(enc))


def _replace(enc: EncodedTensor, i: int, buf: torch.Tensor) -> EncodedTensor:
    bufs = list(enc.buffers)
    bufs[i] = buf
    return EncodedTensor(enc.codec, enc.shape, enc.dtype, tuple(bufs))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_refuses_wrong_lengths_and_metadata(name: str) -> None:
    codec = get_codec(name)
    enc = codec.encode(torch.randn(1000))
    first = enc.buffers[0]
    bad = [
        _replace(enc, 0, first[:-1]),
        _replace(enc, 0, torch.cat([first, first[:1]])),
        EncodedTensor(enc.codec, enc.shape, enc.dtype, enc.buffers[:-1]),
        EncodedTensor(enc.codec, enc.shape, enc.dtype, (*enc.buffers, first)),
        EncodedTensor(enc.codec, (1001,), enc.dtype, enc.buffers),
        EncodedTensor(enc.codec, (-1000,), enc.dtype, enc.buffers),
        EncodedTensor(enc.codec, enc.shape, "int64", enc.buffers),
        EncodedTensor("int8" if name != "int8" else "int4", enc.shape, enc.dtype, enc.buffers),
        _replace(enc, 0, first.view(torch.int8)),  # not uint8
    ]
    for e in bad:
        with pytest.raises(CodecError):
            codec.decode(e)
    with pytest.raises(CodecError, match="expected"):
        codec.decode(enc, expected_shape=(10, 100))


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("bad_scale", [math.nan, math.inf, -1.0])
def test_decode_refuses_bad_scales(name: str, bad_scale: float) -> None:
    codec = get_codec(name)
    enc = codec.encode(torch.randn(600))
    scales = enc.buffers[1].clone().view(torch.float16)
    scales[2] = bad_scale
    with pytest.raises(CodecError, match="scale"):
        codec.decode(_replace(enc, 1, scales.view(torch.uint8)))


def test_decode_refuses_out_of_range_codes() -> None:
    int8, int4 = get_codec("int8"), get_codec("int4")
    enc = int8.encode(torch.randn(300))
    codes = enc.buffers[0].clone()
    codes[17] = 128  # int8 -128
    with pytest.raises(CodecError, match="-128"):
        int8.decode(_replace(enc, 0, codes))
    enc = int4.encode(torch.randn(301))
    packed = enc.buffers[0].clone()
    packed[3] = packed[3] & 0xF0  # low nibble 0
    with pytest.raises(CodecError, match="nibble 0"):
        int4.decode(_replace(enc, 0, packed))
    packed = enc.buffers[0].clone()
    packed[-1] = (packed[-1] & 0x0F) | (3 << 4)  # odd tail: padding nibble must be 8
    with pytest.raises(CodecError, match="padding"):
        int4.decode(_replace(enc, 0, packed))


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
def test_decode_refuses_non_finite_float_payloads(name: str) -> None:
    codec = get_codec(name)
    enc = codec.encode(torch.randn(10))
    wire = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    vals = enc.buffers[0].clone().view(wire)
    vals[4] = math.nan
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(_replace(enc, 0, vals.view(torch.uint8)))


def test_from_header_refuses_malformed_headers() -> None:
    enc = get_codec("int8").encode(torch.randn(10))
    bufs = list(enc.buffers)
    good = enc.header()
    for header in (
        [],
        {**good, "shape": "10"},
        {**good, "shape": [True]},
        {**good, "shape": [-1]},
        {**good, "codec": 8},
        {**good, "nbytes": [1, 2]},
        {**good, "nbytes": "x"},
    ):
        with pytest.raises(CodecError):
            EncodedTensor.from_header(header, bufs)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        EncodedTensor.from_header(good, [np.zeros(10, dtype=np.float32), bufs[1]])
    with pytest.raises(CodecError):
        EncodedTensor.from_header(good, ["not a buffer", bufs[1]])


def test_codec_error_is_a_typed_gossamer_error() -> None:
    assert issubclass(CodecError, GossamerError) and issubclass(CodecError, ValueError)


def test_error_feedback_recovers_what_the_codec_drops() -> None:
    # Per block, int4 rounds anything below absmax/14 to zero. A small but steady gradient next to
    # a big entry is therefore lost forever without error feedback and recovered with it.
    g = torch.zeros(BLOCK)
    g[0] = 1.0
    g[1:] = 0.01
    codec = get_codec("int4")
    ef = ErrorFeedback(codec)
    sent_plain = torch.zeros(BLOCK)
    sent_ef = torch.zeros(BLOCK)
    rounds = 50
    for _ in range(rounds):
        sent_plain += codec.decode(codec.encode(g))
        sent_ef += codec.decode(ef.encode("w", g))
    truth = g * rounds
    assert float(sent_plain[1:].abs().max()) == 0.0
    # With feedback, what was sent plus what is still held back is exactly the truth (up to
    # fp32 rounding), and the held-back residual stays within one quantisation step.
    assert torch.allclose(sent_ef + ef.residuals["w"], truth, rtol=0, atol=1e-4)
    step_half = float(max_abs_error_bound(codec, g).max())  # ≈ absmax/14
    assert float(ef.residuals["w"].abs().max()) <= 1.1 * step_half
    assert float((sent_ef[1:] - truth[1:]).abs().max()) <= 1.1 * step_half
    assert float(sent_ef[1:].min()) > 0.8 * float(truth[1])  # vs 0 without feedback
    ef.reset()
    assert ef.residuals == {}
