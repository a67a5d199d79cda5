"""Named buffers for the data plane: torch tensors, numpy arrays and raw bytes.

Everything becomes a flat, writable-or-readable ``memoryview`` of bytes over
the object's own memory (no copy), plus a :class:`BufferSpec` that the peer
checks before it writes a byte.  torch is never imported here unless the
caller already handed us a tensor (a relay node must start without torch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gossamer.node.errors import ProtocolError, SpecMismatch

# dtype name -> item size; the same names for torch and numpy where both exist
ITEM_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}
KINDS = ("torch", "numpy", "bytes")
MAX_NAME = 512
MAX_DIMS = 16
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class BufferSpec:
    name: str
    kind: str  # "torch" | "numpy" | "bytes"
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.name, self.kind, self.dtype, list(self.shape), self.nbytes]

    @classmethod
    def from_wire(cls, item: Any) -> BufferSpec:
        """Validate one spec from a peer: ProtocolError on anything inconsistent."""
        if not isinstance(item, list) or len(item) != 5:
            raise ProtocolError("a buffer spec is [name, kind, dtype, shape, nbytes]")
        name, kind, dtype, shape, nbytes = item
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ProtocolError("buffer name must be a non-empty string of ≤ 512 chars")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ProtocolError(f"unknown buffer kind {kind!r}"[:80])
        if not isinstance(dtype, str):  # a list here once raised TypeError out of the reader
            raise ProtocolError("dtype must be a string")
        if dtype not in ITEM_SIZES and not (kind == "bytes" and dtype == "bytes"):
            raise ProtocolError(f"unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ProtocolError("shape must be a list of ≤ 16 non-negative integers")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError("nbytes must be a non-negative integer")
        itemsize = 1 if dtype == "bytes" else ITEM_SIZES[dtype]
        if math.prod(shape) * itemsize != nbytes:
            raise ProtocolError(f"buffer {name!r}: shape {shape} × {dtype} is not {nbytes} bytes")
        return cls(name, kind, dtype, tuple(shape), nbytes)


def _torch_bytes_view(tensor: Any, writable: bool) -> memoryview:
    import torch

    if tensor.device.type != "cpu":
        raise SpecMismatch("data-plane tensors must be on the CPU (copy with .cpu() first)")
    if not tensor.is_contiguous():
        raise SpecMismatch("data-plane tensors must be contiguous (use .contiguous())")
    if writable and tensor.requires_grad:
        tensor = tensor.detach()
    flat = tensor.detach().reshape(-1)
    # A uint8 view shares memory and works for every dtype, bfloat16 included,
    # which numpy has no type for.
    raw = flat.view(torch.uint8)
    return memoryview(raw.numpy()).cast("B")


def _torch_dtype_name(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in ITEM_SIZES:
        raise SpecMismatch(f"dtype {tensor.dtype} is not supported by the data plane")
    return name


def describe(name: str, obj: Any, *, writable: bool = False) -> tuple[BufferSpec, memoryview]:
    """(spec, flat byte view) of a tensor, ndarray or bytes-like object, without copying."""
    module = type(obj).__module__
    if module.startswith("torch") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        dtype = _torch_dtype_name(obj)
        view = _torch_bytes_view(obj, writable)
        spec = BufferSpec(name, "torch", dtype, tuple(obj.shape), len(view))
    elif module.startswith("numpy") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        if not obj.flags.c_contiguous:
            raise SpecMismatch(f"array {name!r} must be C-contiguous")
        dtype = obj.dtype.name
        if dtype not in ITEM_SIZES:
            raise SpecMismatch(f"dtype {obj.dtype} of {name!r} is not supported")
        if obj.dtype.byteorder == (">" if sys.byteorder == "little" else "<"):
            raise SpecMismatch(f"array {name!r} is not in native byte order")
        if writable and not obj.flags.writeable:
            raise SpecMismatch(f"array {name!r} is read-only and cannot receive data")
        view = memoryview(obj.reshape(-1).view("uint8")).cast("B") if obj.size else memoryview(b"")
        spec = BufferSpec(name, "numpy", dtype, tuple(obj.shape), obj.nbytes)
    elif isinstance(obj, bytes | bytearray | memoryview):
        view = memoryview(obj).cast("B")
        if writable and view.readonly:
            raise SpecMismatch(f"buffer {name!r} is read-only and cannot receive data")
        spec = BufferSpec(name, "bytes", "bytes", (len(view),), len(view))
    else:
        raise SpecMismatch(
            f"cannot send {type(obj).__name__} {name!r}: use a tensor, array or bytes"
        )
    return spec, view


def normalize(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise SpecMismatch("buffer names in one message must be unique")
    if len(items) > MAX_TENSORS:
        raise SpecMismatch(f"at most {MAX_TENSORS} buffers per message")
    return items


def allocate(spec: BufferSpec) -> Any:
    """Fresh memory for an incoming buffer of ``spec``, of the same kind the sender used."""
    if spec.kind == "torch":
        try:
            import torch
        except ImportError:  # a torch-less node receiving tensors gets numpy or bytes
            spec = BufferSpec(spec.name, "numpy", spec.dtype, spec.shape, spec.nbytes)
        else:
            return torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
    if spec.kind == "numpy":
        import numpy as np

        if spec.dtype == "bfloat16":
            return bytearray(spec.nbytes)
        return np.empty(spec.shape, dtype=spec.dtype)
    return bytearray(spec.nbytes)


def check_matches(incoming: BufferSpec, prepared: BufferSpec) -> None:
    """The receiver prepared memory for ``prepared``; refuse anything else."""
    if incoming.nbytes != prepared.nbytes:
        raise SpecMismatch(
            f"buffer {incoming.name!r}: {incoming.nbytes} bytes arriving, "
            f"{prepared.nbytes} prepared"
        )
    typed = prepared.kind != "bytes" and incoming.kind != "bytes"
    if typed and (incoming.dtype != prepared.dtype or incoming.shape != prepared.shape):
        raise SpecMismatch(
            f"buffer {incoming.name!r}: {incoming.dtype}{list(incoming.shape)} arriving, "
            f"{prepared.dtype}{list(prepared.shape)} prepared"
        )
