"""Byte pipes under a data channel: a direct TCP socket, or a libp2p stream as fallback.

Both give whole-buffer sends and exact-length receives and turn every failure
into ``ChannelClosed`` (sending) or ``EOFError`` (receiving).  The direct socket
also offers blocking variants for a worker thread (see :mod:`channel`).
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

import trio

from gossamer.node import wire
from gossamer.node.errors import ChannelClosed

if TYPE_CHECKING:
    from gossamer.node.host import Stream
    from gossamer.node.shaper import Shaper

STALL_TIMEOUT_S = 30.0  # a peer that reads (or sends) nothing for this long is gone
# A receiving worker thread gives its slot back when the sender pauses this long, or after it
# held it for a slice, so a paused or slow sender never keeps the node's other receives waiting.
RECEIVE_IDLE_S = 0.02
RECEIVE_SLICE_S = 0.05


class Transport:
    """A reliable byte pipe: a direct socket or a libp2p stream."""

    path = ""
    threaded = False  # offers send_all_sync / receive_some_into_sync for worker threads

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def receive_into(self, view: memoryview) -> None:
        """Fill ``view`` completely; EOFError if the pipe ends first."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class SocketTransport(Transport):
    path = "direct"
    threaded = True

    def __init__(
        self,
        stream: trio.SocketStream,
        stall_timeout: float = STALL_TIMEOUT_S,
        shaper: Shaper | None = None,
    ) -> None:
        # A shaped link paces and delays bytes on the event loop, so a shaped socket offers
        # no blocking variants: worker threads would write past the shaper.
        self._shaped = shaper is not None and shaper.active
        self.threaded = not self._shaped
        self._stream: trio.abc.HalfCloseableStream = (
            shaper.wrap(stream) if shaper is not None and self._shaped else stream
        )
        self._socket = stream.socket
        # A second handle on the same connection for worker threads.  Its
        # timeout makes Python wait with poll() on the non-blocking descriptor
        # trio already uses, without the GIL, and bounds a stalled peer.
        self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._raw.settimeout(stall_timeout)
        # and one for the receiving thread, which returns whenever the sender pauses
        self._raw_in = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._raw_in.settimeout(RECEIVE_IDLE_S)
        self.stall_timeout = stall_timeout

    def send_all_sync(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._raw.sendall(data)
        except OSError as exc:  # TimeoutError included: the peer stopped reading
            raise ChannelClosed(f"direct data connection broke: {exc!r}") from None

    def receive_some_into_sync(self, view: memoryview, got: int, until: float) -> int:
        """Worker thread: fill ``view`` from offset ``got``; return the new offset, early when
        the sender pauses for ``RECEIVE_IDLE_S`` or ``time.monotonic()`` passes ``until``."""
        while got < len(view):
            try:
                n = self._raw_in.recv_into(view[got:])
            except TimeoutError:
                return got
            except OSError as exc:
                raise EOFError(f"direct data connection broke: {exc!r}") from None
            if n == 0:
                raise EOFError(f"direct data connection ended after {got} of {len(view)} bytes")
            got += n
            if time.monotonic() >= until:
                return got
        return got

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._socket)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelClosed(f"direct data connection broke: {exc!r}") from None

    async def receive_into(self, view: memoryview) -> None:
        if self._shaped:
            await self._receive_shaped(view)
            return
        got = 0
        while got < len(view):
            try:
                n = await self._socket.recv_into(view[got:])
            except (OSError, trio.ClosedResourceError) as exc:
                raise EOFError(f"direct data connection broke: {exc!r}") from None
            if n == 0:
                raise EOFError(f"direct data connection ended after {got} of {len(view)} bytes")
            got += n

    async def _receive_shaped(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                data = await self._stream.receive_some(len(view) - got)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise EOFError(f"direct data connection broke: {exc!r}") from None
            if not data:
                raise EOFError(f"direct data connection ended after {got} of {len(view)} bytes")
            view[got : got + len(data)] = data
            got += len(data)

    async def aclose(self) -> None:
        self._raw.close()
        self._raw_in.close()
        await self._stream.aclose()


class Libp2pTransport(Transport):
    """Fallback when no direct socket can be made: frames ride the libp2p stream."""

    path = "libp2p"

    def __init__(self, stream: Stream, reader: wire.FrameReader) -> None:
        self._stream = stream
        self._reader = reader  # may already hold bytes read past the handshake

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.write(data)
        except ConnectionError as exc:
            raise ChannelClosed(str(exc)) from None

    async def receive_into(self, view: memoryview) -> None:
        try:
            view[:] = await self._reader.read_exactly(len(view))
        except ConnectionError as exc:
            raise EOFError(str(exc)) from None

    async def aclose(self) -> None:
        await self._stream.close()
