"""Pseudo-gradient compression, chosen by name.

Wire formats (buffers in order, little-endian) and the stated round-trip error, i.e. the bound on
|decode(encode(x)) − x| per element:

* ``none``: [fp32 values]. Error 0.
* ``fp16``: [fp16 values]. Error ≤ max(|x|·2⁻¹¹, 2⁻²⁵).
* ``bf16``: [bf16 values]. Error ≤ max(|x|·2⁻⁸, 2⁻¹³³).
* ``int8``: [int8 codes in −127..127, one per element; fp16 scales, one per block of 256].
  Error ≤ s·(½ + 2⁻¹⁴) with s the block's scale ≥ absmax/127, i.e. ≈ absmax_block/127/2.
* ``int4``: [packed codes: element 2k in the low nibble of byte k, 2k+1 in the high nibble,
  each stored as code+8 in 1..15 (nibble 0 is invalid; an odd tail pads with 8); fp16 scales,
  one per block of 256]. Codes −7..7; error ≤ s·(½ + 2⁻¹⁴), s ≥ absmax/7, ≈ absmax_block/7/2.
  Decoding accumulates in fp32.

Blocks are consecutive runs of 256 elements of the flattened (row-major) tensor; the last block may
be shorter. A block's scale is ``absmax/qmax`` rounded *up* to the next fp16 value, so no element
is ever clipped and the error is at most half a quantisation step (the 2⁻¹⁴ term covers fp32
rounding in x/s and code·s). Scales below fp16's normal range (absmax/qmax < 6.1e-5) are fp16
subnormals: still rounded up, still within the bound, just with a coarser step. A block whose
absmax/qmax exceeds 65504 (|x| > 8.3e6 for int8, > 4.6e5 for int4), or any value outside fp16's
range for ``fp16``, cannot be encoded: ``encode`` raises ``CodecError`` rather than send an inf.
``max_abs_error_bound(codec, x)`` returns the per-element bound above, computed from the scales
``encode`` would choose; the tests hold every codec to it.

Decoding is for bytes from untrusted peers: ``decode`` checks the codec name, shape, dtype, the
number, type and exact length of every buffer, that scales are finite and ≥ 0 and that 4-bit codes
are in range, and raises ``CodecError`` (a ``ValueError``) on the first violation; its result is
always a finite fp32 tensor. ``encode`` refuses non-finite input the same way.

Zero-copy: ``EncodedTensor.buffers`` are 1-D contiguous uint8 tensors; ``memoryview(b.numpy())``
hands them to a socket without a copy. ``none`` returns a *view of the input's memory* (no copy):
do not modify the input until the buffer has been sent. ``EncodedTensor.header()`` is the
msgpack-friendly metadata; ``EncodedTensor.from_header(header, buffers)`` rebuilds one on the
receiving side (accepting tensors, numpy arrays, bytes or memoryviews).

Speed, 25M floats (100 MB fp32, randn, 25M is not a multiple of 256), 1 torch thread, the 2-core
dev machine while quiet (load 0.3; best of 3, ms):

    codec   encode  decode   encoded MB
    none         3      48     100.0
    fp16        29      46      50.0
    bf16        31      48      50.0
    int8        78      48      25.2
    int4        81      60      12.7

(encode includes the finiteness check; decode the validation and one fresh fp32 output, whose page
faults are most of the 48 ms). Under load from other processes (load 3.8) the same run gave up to
2× these figures, while a bare ``x.half()`` took 29 ms and ``bytes(memoryview(x.numpy()))``
47 ms. LIBP2P-NOTES.md measured fp16 38 ms, int8 ~160 ms, 4-bit ~250 ms to encode.
Reproduce with ``python -m gossamer.training.codecs``.)
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer.node import ProtocolError

__all__ = [
    "BLOCK",
    "CODEC_NAMES",
    "Codec",
    "CodecError",
    "EncodedTensor",
    "ErrorFeedback",
    "as_uint8",
    "get_codec",
    "max_abs_error_bound",
]

if sys.byteorder != "little":  # pragma: no cover - no such torch host in sight
    raise ImportError("gossamer.training.codecs assumes a little-endian host (the wire format)")

BLOCK = 256
_FP16_MAX = 65504.0
_ROUNDING_SLACK = 2.0**-14  # fp32 rounding in x/s and code·s, in units of s
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class CodecError(ProtocolError, ValueError):
    """An encoding that cannot be produced, or received bytes that do not decode.

    A ``ProtocolError`` (hence a ``GossamerError``) because on the receiving side it means a peer
    sent bytes that break the format; also a ``ValueError`` for callers outside the node.
    """


@dataclass(frozen=True)
class EncodedTensor:
    """One compressed tensor: metadata plus raw byte buffers ready to send.

    ``dtype`` is the source tensor's dtype name (the receiver may cast the fp32 result back);
    ``buffers`` are 1-D contiguous ``torch.uint8`` CPU tensors whose layout the codec defines.
    """

    codec: str
    shape: tuple[int, ...]
    dtype: str
    buffers: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (the buffers; the small header not counted)."""
        return sum(int(b.numel()) for b in self.buffers)

    def header(self) -> dict[str, Any]:
        """Metadata for the wire (msgpack-friendly: str, list[int])."""
        return {
            "codec": self.codec,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "nbytes": [int(b.numel()) for b in self.buffers],
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any], buffers: Sequence[Any]) -> EncodedTensor:
        """Rebuild from untrusted wire parts, checking types (``decode`` checks the sizes)."""
        if not isinstance(header, Mapping):
            raise CodecError("header is not a mapping")
        codec, shape, dtype = header.get("codec"), header.get("shape"), header.get("dtype")
        if not isinstance(codec, str) or not isinstance(dtype, str):
            raise CodecError("header codec and dtype must be strings")
        if not isinstance(shape, (list, tuple)) or len(shape) > 16:
            raise CodecError("header shape must be a list of at most 16 dimensions")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CodecError(f"header shape {shape!r} must hold non-negative integers")
        nbytes = header.get("nbytes")
        bufs = tuple(as_uint8(b) for b in buffers)
        if nbytes is not None and (
            not isinstance(nbytes, (list, tuple)) or list(nbytes) != [b.numel() for b in bufs]
        ):
            raise CodecError(f"header announces {nbytes!r} bytes, got {[b.numel() for b in bufs]}")
        return cls(codec, tuple(shape), dtype, bufs)


def as_uint8(buf: Any) -> torch.Tensor:
    """View a received buffer (tensor, numpy array, bytes-like) as a 1-D uint8 tensor, no copy."""
    if isinstance(buf, torch.Tensor):
        t = buf
    elif isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8:
            raise CodecError(f"buffer has numpy dtype {buf.dtype}, expected uint8")
        t = torch.from_numpy(np.ascontiguousarray(buf))
    elif isinstance(buf, (bytes, bytearray, memoryview)):
        try:
            size = memoryview(buf).nbytes
        except (TypeError, ValueError) as exc:
            raise CodecError(f"unusable buffer: {exc}") from exc
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # read-only buffers: we never write into them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=torch.uint8)
    else:
        raise CodecError(f"unsupported buffer type {type(buf).__name__}")
    if t.dtype != torch.uint8 or t.dim() != 1 or t.device.type != "cpu":
        raise CodecError(f"buffer must be a 1-D uint8 CPU tensor, got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def _view_as(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as ``dtype``; copies only if the storage offset is misaligned."""
    try:
        return buf.view(dtype)
    except RuntimeError:
        return buf.clone().view(dtype)


def _flat_fp32(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise CodecError(f"cannot encode a {tensor.dtype} tensor: floating point only")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)


def _all_finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and see ±inf; far faster than isfinite(t).all() on CPU.
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _dtype_name(tensor: torch.Tensor) -> str:
    return (
        str(tensor.dtype).removeprefix("torch.") if tensor.dtype in _DTYPES.values() else "float32"
    )


class Codec:
    """Base class: subclasses set ``name`` and implement the four methods."""

    name: str = ""

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        raise NotImplementedError

    def decode(
        self, encoded: EncodedTensor, *, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def buffer_sizes(self, numel: int) -> tuple[int, ...]:
        """Exact byte length of each buffer for a tensor of ``numel`` elements."""
        raise NotImplementedError

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(tensor)) − tensor| (fp32, tensor's shape)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<codec {self.name}>"

    # shared checks on received data --------------------------------------------------------
    def _check(
        self, encoded: EncodedTensor, expected_shape: Sequence[int] | None
    ) -> tuple[int, tuple[torch.Tensor, ...]]:
        if not isinstance(encoded, EncodedTensor):
            raise CodecError(f"expected an EncodedTensor, got {type(encoded).__name__}")
        if encoded.codec != self.name:
            raise CodecError(f"encoded with {encoded.codec!r}, decoding with {self.name!r}")
        if encoded.dtype not in _DTYPES:
            raise CodecError(f"unknown source dtype {encoded.dtype!r}")
        shape = encoded.shape
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CodecError(f"invalid shape {shape!r}")
        if expected_shape is not None and tuple(shape) != tuple(expected_shape):
            raise CodecError(f"shape {tuple(shape)} != expected {tuple(expected_shape)}")
        numel = encoded.numel
        bufs = tuple(as_uint8(b) for b in encoded.buffers)
        want = self.buffer_sizes(numel)
        got = tuple(int(b.numel()) for b in bufs)
        if got != want:
            raise CodecError(f"{self.name}: buffer sizes {got} != {want} for shape {tuple(shape)}")
        return numel, bufs


class _Float(Codec):
    """fp32 / fp16 / bf16: a plain cast."""

    def __init__(self, name: str, wire: torch.dtype, unit: float, tiny: float) -> None:
        self.name = name
        self._wire = wire
        self._width = torch.empty(0, dtype=wire).element_size()
        self._unit, self._tiny = unit, tiny

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        flat = _flat_fp32(tensor)
        wire = flat if self._wire == torch.float32 else flat.to(self._wire)
        if not _all_finite(wire):
            bad = "non-finite" if not _all_finite(flat) else f"out of {self.name} range"
            raise CodecError(f"{self.name}: input has {bad} values")
        return EncodedTensor(
            self.name, tuple(tensor.shape), _dtype_name(tensor), (wire.view(torch.uint8),)
        )

    def decode(
        self, encoded: EncodedTensor, *, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        _, (buf,) = self._check(encoded, expected_shape)
        # Always a copy: the result must not alias a (possibly read-only) receive buffer.
        out = _view_as(buf, self._wire).to(torch.float32, copy=True)
        if not _all_finite(out):
            raise CodecError(f"{self.name}: received non-finite values")
        return out.reshape(encoded.shape)

    def buffer_sizes(self, numel: int) -> tuple[int, ...]:
        return (numel * self._width,)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().float()
        if self._unit == 0.0:
            return torch.zeros_like(x)
        return torch.clamp(x.abs() * self._unit, min=self._tiny)


class _Blockwise(Codec):
    """Symmetric absmax quantisation per block of 256 with fp16 scales (int8 and int4)."""

    def __init__(self, name: str, qmax: int) -> None:
        self.name = name
        self.qmax = qmax

    # scales ---------------------------------------------------------------------------------
    def _scales(self, flat: torch.Tensor) -> torch.Tensor:
        """fp16 scale per block: absmax/qmax rounded up to the next fp16 value."""
        n = flat.numel()
        nfull, tail = divmod(n, BLOCK)
        parts = []
        if nfull:
            blocks = flat[: nfull * BLOCK].view(nfull, BLOCK)
            # amax and amin separately: much faster than abs().amax() or aminmax(dim=1) on CPU.
            parts.append(torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()))
        if tail:
            lo, hi = torch.aminmax(flat[nfull * BLOCK :])
            parts.append(torch.maximum(hi, -lo).reshape(1))
        absmax = torch.cat(parts) if parts else torch.empty(0)
        if not bool(torch.isfinite(absmax).all()):
            raise CodecError(f"{self.name}: input has non-finite values")
        # float64: absmax/qmax of an fp32 subnormal would underflow to 0 in fp32 (found by
        # hypothesis), and then a zero scale would decode a non-zero block as zeros.
        want = absmax.to(torch.float64) / self.qmax
        s16 = want.to(torch.float16)
        # Positive fp16 bit patterns are ordered like the values: +1 is the next value up.
        low = s16.to(torch.float64) < want
        s16 = (s16.view(torch.int16) + low.to(torch.int16)).view(torch.float16)
        if not bool(torch.isfinite(s16).all()):
            worst = float(absmax.max())
            raise CodecError(
                f"{self.name}: block absmax {worst:.3g} exceeds the fp16 scale range "
                f"({_FP16_MAX * self.qmax:.3g})"
            )
        return s16

    def _quantise(self, flat: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
        """Write round(x/s) clamped to ±qmax into ``out`` (int8 or uint8, offset applied later)."""
        n = flat.numel()
        nfull, tail = divmod(n, BLOCK)
        safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero blocks: 0/1 = 0
        if nfull:
            q = torch.div(flat[: nfull * BLOCK].view(nfull, BLOCK), safe[:nfull, None])
            q.round_().clamp_(-self.qmax, self.qmax)
            out[: nfull * BLOCK].view(nfull, BLOCK).copy_(q)
        if tail:
            q = torch.div(flat[nfull * BLOCK :], safe[nfull])
            q.round_().clamp_(-self.qmax, self.qmax)
            out[nfull * BLOCK :].copy_(q)

    @staticmethod
    def _dequantise(codes: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
        """codes (int8, length n) · per-block scale -> fp32, without expanding the scales."""
        out = codes.to(torch.float32)  # then scale in place: 2× faster than a mixed-dtype mul
        nfull, tail = divmod(n, BLOCK)
        if nfull:
            out[: nfull * BLOCK].view(nfull, BLOCK).mul_(s[:nfull, None])
        if tail:
            out[nfull * BLOCK :].mul_(s[nfull])
        return out

    def _received_scales(self, buf: torch.Tensor) -> torch.Tensor:
        s = _view_as(buf, torch.float16).to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise CodecError(f"{self.name}: received a non-finite scale")
        if bool((s < 0).any()):
            raise CodecError(f"{self.name}: received a negative scale")
        return s

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = _flat_fp32(tensor)
        s = self._scales(flat).to(torch.float32)
        per_block = s * (0.5 + _ROUNDING_SLACK)
        return per_block.repeat_interleave(BLOCK)[: flat.numel()].reshape(tensor.shape)

    def _n_scales(self, numel: int) -> int:
        return -(-numel // BLOCK)


class _Int8(_Blockwise):
    def __init__(self) -> None:
        super().__init__("int8", 127)

    def buffer_sizes(self, numel: int) -> tuple[int, ...]:
        return (numel, 2 * self._n_scales(numel))

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        flat = _flat_fp32(tensor)
        s16 = self._scales(flat)
        codes = torch.empty(flat.numel(), dtype=torch.int8)
        self._quantise(flat, s16.to(torch.float32), codes)
        bufs = (codes.view(torch.uint8), s16.view(torch.uint8))
        return EncodedTensor(self.name, tuple(tensor.shape), _dtype_name(tensor), bufs)

    def decode(
        self, encoded: EncodedTensor, *, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        n, (codes_u8, scales_u8) = self._check(encoded, expected_shape)
        s = self._received_scales(scales_u8)
        codes = codes_u8.view(torch.int8)
        if n and int(codes.min()) == -128:
            raise CodecError("int8: code -128 is outside the symmetric range")
        return self._dequantise(codes, s, n).reshape(encoded.shape)


class _Int4(_Blockwise):
    def __init__(self) -> None:
        super().__init__("int4", 7)

    def buffer_sizes(self, numel: int) -> tuple[int, ...]:
        return (-(-numel // 2), 2 * self._n_scales(numel))

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        flat = _flat_fp32(tensor)
        n = flat.numel()
        s16 = self._scales(flat)
        nib = torch.empty(n + (n & 1), dtype=torch.int8)
        self._quantise(flat, s16.to(torch.float32), nib[:n])
        if n & 1:
            nib[n] = 0
        nib.add_(8)  # codes -7..7 -> 1..15; the odd tail pads with code 0 (8)
        u = nib.view(torch.uint8)
        packed = torch.bitwise_or(u[0::2], torch.bitwise_left_shift(u[1::2], 4))
        return EncodedTensor(
            self.name, tuple(tensor.shape), _dtype_name(tensor), (packed, s16.view(torch.uint8))
        )

    def decode(
        self, encoded: EncodedTensor, *, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        n, (packed, scales_u8) = self._check(encoded, expected_shape)
        s = self._received_scales(scales_u8)
        codes = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)  # low nibble first
        if n & 1 and int(codes[n]) != 8:
            raise CodecError("int4: the padding nibble of an odd-length tensor must be 8")
        signed = codes[:n].view(torch.int8)
        if n and int(signed.min()) == 0:
            raise CodecError("int4: nibble 0 (code -8) is outside the symmetric range")
        signed.sub_(8)
        return self._dequantise(signed, s, n).reshape(encoded.shape)


_CODECS: dict[str, Codec] = {
    "none": _Float("none", torch.float32, 0.0, 0.0),
    "fp16": _Float("fp16", torch.float16, 2.0**-11, 2.0**-25),
    "bf16": _Float("bf16", torch.bfloat16, 2.0**-8, 2.0**-133),
    "int8": _Int8(),
    "int4": _Int4(),
}
_ALIASES = {"fp32": "none"}
CODEC_NAMES: tuple[str, ...] = tuple(_CODECS)


def get_codec(name: str) -> Codec:
    """The codec called ``name`` (one of ``CODEC_NAMES``; ``fp32`` is an alias of ``none``)."""
    codec = _CODECS.get(_ALIASES.get(name, name))
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return codec


def max_abs_error_bound(codec: Codec | str, tensor: torch.Tensor) -> torch.Tensor:
    """Per-element bound on the round-trip error of ``codec`` on ``tensor`` (see module doc)."""
    c = get_codec(codec) if isinstance(codec, str) else codec
    return c.error_bound(tensor)


class ErrorFeedback:
    """Carry each tensor's compression error into its next encoding.

    ``encode(name, g)`` compresses ``g + residual[name]`` and keeps
    ``residual[name] = (g + residual[name]) − decode(...)``, so what the codec drops in one
    round is sent in a later one instead of being lost. One instance per worker; residuals are
    local state and never leave the worker.
    """

    def __init__(self, codec: Codec | str) -> None:
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.residuals: dict[str, torch.Tensor] = {}

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        target = tensor.detach().to(torch.float32)
        residual = self.residuals.get(name)
        if residual is not None:
            if residual.shape != target.shape:
                raise ValueError(f"{name}: shape {tuple(target.shape)} != residual's")
            target = target + residual
        encoded = self.codec.encode(target)
        self.residuals[name] = target - self.codec.decode(encoded)
        return encoded

    def reset(self) -> None:
        self.residuals.clear()


def _benchmark(numel: int = 25_000_000, repeats: int = 3) -> None:
    torch.set_num_threads(1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    print(f"{numel} floats, 1 thread, best of {repeats} (ms)")
    print("codec   encode  decode  encoded MB")
    for name in CODEC_NAMES:
        codec = get_codec(name)
        enc_t, dec_t = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = codec.encode(x)
            t1 = time.perf_counter()
            codec.decode(enc)
            t2 = time.perf_counter()
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
        print(f"{name:6} {min(enc_t) * 1e3:7.0f} {min(dec_t) * 1e3:7.0f} {enc.nbytes / 1e6:10.1f}")


if __name__ == "__main__":
    _benchmark()
