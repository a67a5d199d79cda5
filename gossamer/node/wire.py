"""Bytes on the wire: length-prefixed frames and bounded msgpack.

A frame is a 4-byte big-endian length followed by that many bytes.  Every
reader passes the largest frame it accepts, and the length is checked before a
single payload byte is buffered, so a peer cannot make us allocate more than
the limit.  msgpack decoding gets explicit limits on every container and
refuses extension types; tuples are packed as lists and bytes stay bytes.

**Bounded decoding.**  Limits per container do not bound the whole: 4 MiB of
``[[], [], …]`` nested a few levels deep is four million objects (seconds of
CPU, hundreds of MB).  :func:`unpack` therefore first walks the encoded bytes
(:func:`scan`: no object is built, nothing is allocated but a stack as deep as
the nesting limit) and counts every object, checks every container's length
and the nesting depth, and stops at the first limit passed; only input within
all limits reaches msgpack's decoder.  The walk costs at most one step per
object of the budget, however large the input.  :func:`unpack_async` runs
large decodes on a worker thread, a few at a time, so that one peer's big
message does not stall the event loop.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Protocol

import msgpack
import trio

from gossamer.node.errors import FrameTooLarge, ProtocolError

LENGTH = struct.Struct(">I")
MAX_DEPTH = 32
MAX_CONTAINER = 100_000
# Room for one full map of MAX_CONTAINER entries (a state vector: keys and values count)
# and what wraps it, the largest message any caller expects; pass a tighter one where known.
MAX_OBJECTS = 1 << 18
THREAD_THRESHOLD = 64 << 10  # unpack_async decodes larger inputs on a worker thread
DECODE_THREADS = 2  # large decodes at a time, over all peers (each bounded by its limits)


class ByteStream(Protocol):
    """What we need from a libp2p stream (INetStream) or a test double of bytes."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def pack(obj: Any) -> bytes:
    """msgpack-encode a header-sized object (never a tensor: see the data plane)."""
    return msgpack.packb(obj, use_bin_type=True)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def _fixed_sizes() -> tuple[int, ...]:
    """First byte -> length of a token that has no children and no length field, else 0."""
    sizes = [0] * 256
    for b in range(0x80):
        sizes[b] = 1  # positive fixint
    for b in range(0xE0, 0x100):
        sizes[b] = 1  # negative fixint
    for b in range(0xA0, 0xC0):
        sizes[b] = 1 + (b & 0x1F)  # fixstr
    for b, size in {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9}.items():
        sizes[b] = size  # nil, false, true, float 32 and 64
    for first in (0xCC, 0xD0):
        for i, width in enumerate((1, 2, 4, 8)):
            sizes[first + i] = 1 + width  # uint and int 8 … 64
    return tuple(sizes)


_FIXED = _fixed_sizes()
_LENGTH_FIELD = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin 8/16/32, str 8/16/32
_CONTAINER_FIELD = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # (width, per entry)
_EXT = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))


def scan(
    data: bytes | bytearray | memoryview,
    *,
    max_objects: int = MAX_OBJECTS,
    max_container: int = MAX_CONTAINER,
    max_depth: int = MAX_DEPTH,
) -> int:
    """The number of objects in one encoded msgpack object; ProtocolError past a limit.

    Walks the encoding without building anything: every object counts (a map
    entry is two, its key and its value), no array or map may have more than
    ``max_container`` items, nothing may nest deeper than ``max_depth`` (the
    top-level object is at depth 1), extension types are refused, and the
    object must fill ``data`` exactly.  Stops at the first limit passed, so a
    refusal costs at most ``max_objects`` steps.
    """
    end = len(data)
    fixed = _FIXED
    pos = objects = 0
    left = 1  # items still to read in the innermost open container (the input is one item)
    depth = 1  # the depth of those items
    enclosing: list[int] = []  # items left in each container around it
    while True:
        if not left:
            if not enclosing:
                break
            left = enclosing.pop()
            depth -= 1
            continue
        left -= 1
        objects += 1
        if objects > max_objects:
            raise ProtocolError(f"too many objects (more than {max_objects})")
        if pos >= end:
            raise ProtocolError("truncated msgpack")
        first = data[pos]
        size = fixed[first]
        if size:
            pos += size
            continue
        if 0x80 <= first <= 0x9F:  # fixmap, fixarray
            count, per_item = first & 0x0F, 2 if first <= 0x8F else 1
            pos += 1
        elif first in _CONTAINER_FIELD:
            width, per_item = _CONTAINER_FIELD[first]
            count = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        elif first in _LENGTH_FIELD:
            width = _LENGTH_FIELD[first]
            pos += 1 + width + int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            continue
        elif first in _EXT:
            raise ProtocolError("msgpack extension types are not accepted")
        else:  # 0xC1, never used
            raise ProtocolError(f"malformed msgpack: byte 0x{first:02x} at {pos}")
        if count > max_container:
            raise ProtocolError(
                f"msgpack container of {count} items (the limit is {max_container})"
            )
        if count:
            if depth >= max_depth:
                raise ProtocolError(f"msgpack nesting deeper than {max_depth}")
            enclosing.append(left)
            left, depth = count * per_item, depth + 1
    if pos != end:
        raise ProtocolError("truncated msgpack" if pos > end else "trailing bytes after msgpack")
    return objects


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    max_container: int = MAX_CONTAINER,
    max_objects: int = MAX_OBJECTS,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Decode one msgpack object with limits; ProtocolError on anything malformed.

    Limits (checked by :func:`scan` before anything is built): at most
    ``max_objects`` objects in all, no container longer than ``max_container``
    items, nesting at most ``max_depth``, no extension types, no trailing
    bytes; and no string or binary longer than the input itself.
    """
    scan(data, max_objects=max_objects, max_container=max_container, max_depth=max_depth)
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
        # the type only: the library's text may quote the peer's bytes back at it
        raise ProtocolError(f"malformed msgpack ({type(exc).__name__})") from None
    for key in obj if isinstance(obj, dict) else ():
        if not isinstance(key, str | int | bytes):
            raise ProtocolError("msgpack map keys must be strings, integers or bytes")
    return obj


_decode_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "gossamer.wire.decode_limiter"
)


def _limiter() -> trio.CapacityLimiter:
    try:
        return _decode_limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DECODE_THREADS)
        _decode_limiter.set(limiter)
        return limiter


async def unpack_async(
    data: bytes | bytearray | memoryview,
    *,
    max_container: int = MAX_CONTAINER,
    max_objects: int = MAX_OBJECTS,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """:func:`unpack`, on a worker thread when ``data`` is over :data:`THREAD_THRESHOLD` bytes.

    At most :data:`DECODE_THREADS` such decodes run at once in a trio run (the
    rest wait their turn), so many peers' large messages together cost at most
    that many decodes' CPU and memory at a time.
    """
    decode = functools.partial(
        unpack, data, max_container=max_container, max_objects=max_objects, max_depth=max_depth
    )
    if len(data) <= THREAD_THRESHOLD:
        return decode()
    return await trio.to_thread.run_sync(decode, limiter=_limiter())


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
