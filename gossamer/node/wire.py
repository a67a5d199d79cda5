"""Bytes on the wire: length-prefixed frames and bounded msgpack.

A frame is a 4-byte big-endian length followed by that many bytes.  Every
reader passes the largest frame it accepts, and the length is checked before a
single payload byte is buffered, so a peer cannot make us allocate more than
the limit.  msgpack decoding gets explicit limits on every container and
refuses extension types; tuples are packed as lists and bytes stay bytes.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

import msgpack

from gossamer.node.errors import FrameTooLarge, ProtocolError

LENGTH = struct.Struct(">I")
MAX_DEPTH = 32


class ByteStream(Protocol):
    """What we need from a libp2p stream (INetStream) or a test double of bytes."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def pack(obj: Any) -> bytes:
    """msgpack-encode a header-sized object (never a tensor: see the data plane)."""
    return msgpack.packb(obj, use_bin_type=True)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a decoded object, stopping early once it passes ``limit``."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def unpack(data: bytes | bytearray | memoryview, *, max_container: int = 100_000) -> Any:
    """Decode one msgpack object with limits; ProtocolError on anything malformed.

    Limits: no container longer than ``max_container`` items, no string or
    binary longer than the input itself, no extension types, nesting at most
    ``MAX_DEPTH``, and no trailing bytes.
    """
    size = len(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            ext_hook=_refuse_ext,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=max_container,
            max_map_len=max_container,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises ExtraData, ValueError, TypeError, StackError …
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    if _depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise ProtocolError(f"msgpack nesting deeper than {MAX_DEPTH}")
    for key in obj if isinstance(obj, dict) else ():
        if not isinstance(key, str | int | bytes):
            raise ProtocolError("msgpack map keys must be strings, integers or bytes")
    return obj


def frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Reads exact byte counts and length-prefixed frames from a libp2p stream.

    libp2p's ``read(n)`` returns whatever is available up to ``n`` bytes, so a
    frame may arrive in pieces; the reader keeps the leftover for the next call.
    """

    def __init__(self, stream: ByteStream, read_size: int = 1 << 16) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._read_size = read_size

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = await self._stream.read(max(self._read_size, n - len(self._buffer)))
            if not chunk:
                raise EOFError(f"stream ended after {len(self._buffer)} of {n} bytes")
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def wait_readable(self) -> bool:
        """Wait until at least one byte is buffered; False on a clean end of stream."""
        if not self._buffer:
            chunk = await self._stream.read(self._read_size)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def read_frame(self, limit: int, what: str = "frame") -> bytes | None:
        """Next frame's payload, or None on a clean end of stream between frames."""
        if not await self.wait_readable():
            return None
        (size,) = LENGTH.unpack(await self.read_exactly(LENGTH.size))
        if size > limit:
            raise FrameTooLarge(size, limit, what)
        return await self.read_exactly(size)
