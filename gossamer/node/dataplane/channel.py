"""One data channel to one peer: sealed frames over a direct TCP socket or a libp2p stream.

A channel is duplex.  Each side sends whole messages (BEGIN, DATA…, END)
under a send lock, and acknowledges every message it receives (ACK), so
``send`` returns only when the peer holds the bytes, verified.  The reader
never writes: acknowledgements go through a queue to a writer task, so a
reader is never stuck behind our own outgoing message.

On a direct socket the DATA frames of a message are sealed and sent, or
received and opened, in one worker thread per message: blocking socket calls
and AES-GCM both release the GIL, and the event loop is spared one wake-up per
partial send or receive (measured: the async loop cost ~3x the CPU per GB of a
plain socket).  Control frames and everything that decides stay on trio.

Failure rules: a frame that fails authentication, a malformed header or a
stream that ends inside a message closes the channel; the message in progress
fails with IntegrityError or TruncatedTransfer on the receiving side, and every
send waiting for an ACK fails with ChannelClosed.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import wire
from gossamer.node.dataplane import sealing
from gossamer.node.dataplane.tensors import BufferSpec
from gossamer.node.errors import (
    ChannelClosed,
    GossamerError,
    IntegrityError,
    ProtocolError,
    TransferError,
    TruncatedTransfer,
)

if TYPE_CHECKING:
    from gossamer.node._libp2p_compat import Stream

log = logging.getLogger("gossamer.node.dataplane")

MAX_FRAME = 16 << 20  # largest DATA plaintext a receiver accepts
MAX_CONTROL_FRAME = 4 << 20  # BEGIN with many specs stays far below this
STALL_TIMEOUT_S = 30.0  # a peer that reads nothing for this long is gone


class StaleChannel(ChannelClosed):
    """The channel was already dead when a message started: nothing of it was delivered."""


class Transport:
    """A reliable byte pipe: a direct socket or a libp2p stream."""

    path = ""
    threaded = False  # offers send_all_sync / receive_into_sync for worker threads

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

    def __init__(self, stream: trio.SocketStream, stall_timeout: float = STALL_TIMEOUT_S) -> None:
        self._stream = stream
        self._socket = stream.socket
        # A second handle on the same connection for worker threads.  Its
        # timeout makes Python wait with poll() on the non-blocking descriptor
        # trio already uses, without the GIL, and bounds a stalled peer.
        self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._raw.settimeout(stall_timeout)

    def send_all_sync(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._raw.sendall(data)
        except OSError as exc:  # TimeoutError included: the peer stopped reading
            raise ChannelClosed(f"direct data connection broke: {exc!r}") from None

    def receive_into_sync(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._raw.recv_into(view[got:])
            except OSError as exc:
                raise EOFError(f"direct data connection broke: {exc!r}") from None
            if n == 0:
                raise EOFError(f"direct data connection ended after {got} of {len(view)} bytes")
            got += n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelClosed(f"direct data connection broke: {exc!r}") from None

    async def receive_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = await self._socket.recv_into(view[got:])
            except (OSError, trio.ClosedResourceError) as exc:
                raise EOFError(f"direct data connection broke: {exc!r}") from None
            if n == 0:
                raise EOFError(f"direct data connection ended after {got} of {len(view)} bytes")
            got += n

    async def aclose(self) -> None:
        self._raw.close()
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


@dataclass
class Delivery:
    """Where an incoming message lands, handed out by the data plane's mailbox."""

    views: list[memoryview]
    finish: Callable[[float, str], None]  # (seconds, path) once verified
    fail: Callable[[BaseException], None]
    discard: bool = False  # True: decrypt and verify, but keep nothing
    refusal: str = ""  # why it is discarded (sent back in the ACK)


@dataclass
class SendReport:
    """What ``send`` did: bytes of payload, seconds until ACK, and the path used."""

    nbytes: int
    seconds: float
    path: str
    frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")


class Channel:
    """A live data channel to ``peer_id``."""

    _ids = itertools.count(1)

    def __init__(
        self,
        peer_id: str,
        transport: Transport,
        sealer: sealing.Sealer,
        opener: sealing.Opener,
        claim: Callable[[str, int, str, list[BufferSpec]], Any],
        *,
        chunk_bytes: int,
        max_message_bytes: int,
        stall_timeout: float = STALL_TIMEOUT_S,
        limiters: tuple[trio.CapacityLimiter, trio.CapacityLimiter] | None = None,
    ) -> None:
        self.peer_id = peer_id
        # (send, receive) worker-thread slots shared by the node's channels: more
        # threads than that only fight over the GIL (measured in the all-reduce)
        self._limiters = limiters or (trio.CapacityLimiter(1), trio.CapacityLimiter(1))
        self.transport = transport
        self.number = next(self._ids)
        self._sealer = sealer
        self._opener = opener
        self._claim = claim
        self._chunk = min(chunk_bytes, MAX_FRAME)
        self._max_message = max_message_bytes
        self._stall_timeout = stall_timeout
        self._send_lock = trio.Lock()
        self._msg_ids = itertools.count(1)
        self._acks: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._ack_send, self._ack_recv = trio.open_memory_channel[bytes](256)
        self._out = bytearray(sealing.HEADER.size + self._chunk + sealing.TAG_BYTES)
        self._in = bytearray(0)
        self.closed = trio.Event()
        self.close_reason = ""
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def path(self) -> str:
        return self.transport.path

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Read frames until the channel ends; close it on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ack_writer)
                try:
                    await self._read_until_closed()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _read_until_closed(self) -> None:
        # Errors are handled here, inside the nursery body, so that they are
        # not wrapped in an exception group on their way out.
        try:
            await self._read_loop()
        except (IntegrityError, ProtocolError) as exc:
            log.warning("data channel %d from %s closed: %s", self.number, self.peer_id[-8:], exc)
            self.close_reason = str(exc)
        except (EOFError, ChannelClosed) as exc:
            log.debug("data channel %d to %s ended: %s", self.number, self.peer_id[-8:], exc)
            self.close_reason = self.close_reason or str(exc)

    async def aclose(self, reason: str = "closed locally") -> None:
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                async with self._send_lock:
                    await self._write_frame(self._sealer.seal(sealing.CLOSE, b""))
            except ChannelClosed:
                pass  # the other side went first; nothing to say goodbye to
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for event, slot in self._acks.values():
            if not slot:
                slot.append(ChannelClosed(f"data channel closed: {self.close_reason}"))
            event.set()
        try:
            await self.transport.aclose()
        except Exception:  # the transport is already broken: nothing to release
            log.debug("closing data transport", exc_info=True)

    # ------------------------------------------------------------------ sending

    async def _write_frame(self, data: bytes | bytearray | memoryview) -> None:
        # A frame is written whole or the channel is dead: cancelling halfway
        # through would desynchronise the peer's reader.  So the write is
        # shielded, with its own stall deadline.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._stall_timeout
            try:
                await self.transport.send_all(data)
            except ChannelClosed as exc:
                self.close_reason = self.close_reason or str(exc)
                await self._shutdown()
                raise
        if scope.cancelled_caught:
            self.close_reason = f"peer read nothing for {self._stall_timeout:.0f} s"
            await self._shutdown()
            raise ChannelClosed(self.close_reason)

    async def send(self, tag: str, items: list[tuple[BufferSpec, memoryview]]) -> SendReport:
        """Send one message and wait for the peer's verified acknowledgement."""
        if self.closed.is_set():
            raise ChannelClosed(f"data channel closed: {self.close_reason}")
        total = sum(spec.nbytes for spec, _ in items)
        if total > self._max_message:
            raise TransferError(f"message of {total} bytes exceeds {self._max_message}")
        msg_id = next(self._msg_ids)
        event, slot = trio.Event(), []
        self._acks[msg_id] = (event, slot)
        start = time.perf_counter()
        frames = 0
        try:
            async with self._send_lock:
                begin = {"i": msg_id, "t": tag, "s": [spec.to_wire() for spec, _ in items]}
                try:
                    await self._write_frame(self._sealer.seal(sealing.BEGIN, wire.pack(begin)))
                except ChannelClosed as exc:
                    raise StaleChannel(str(exc)) from None
                try:
                    if self.transport.threaded:
                        frames = await self._send_data_in_thread(items)
                    else:
                        frames = await self._send_data(items)
                except trio.Cancelled:
                    with trio.move_on_after(1) as scope:
                        scope.shield = True
                        abort = wire.pack({"i": msg_id, "why": "cancelled"})
                        await self._write_frame(self._sealer.seal(sealing.ABORT, abort))
                    raise
                end = {"i": msg_id, "f": frames, "b": total}
                await self._write_frame(self._sealer.seal(sealing.END, wire.pack(end)))
            self.bytes_sent += total
            await event.wait()
        finally:
            self._acks.pop(msg_id, None)
        (verdict,) = slot
        if isinstance(verdict, BaseException):
            raise verdict
        return SendReport(total, time.perf_counter() - start, self.path, frames)

    async def _send_data(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        out = memoryview(self._out)
        frames = 0
        for _spec, view in items:
            for offset in range(0, len(view), self._chunk):
                size = self._sealer.seal_into(
                    sealing.DATA, view[offset : offset + self._chunk], out
                )
                await self._write_frame(out[:size])
                frames += 1
                # let cancellation and other tasks in between frames
                await trio.lowlevel.checkpoint()
        return frames

    async def _send_data_in_thread(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        try:
            return await trio.to_thread.run_sync(
                self._send_data_sync, items, limiter=self._limiters[0]
            )
        except ChannelClosed as exc:
            self.close_reason = self.close_reason or str(exc)
            await self._shutdown()
            raise

    def _send_data_sync(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        """Worker thread: seal and send every DATA frame of a message (send lock held)."""
        transport = self.transport
        assert isinstance(transport, SocketTransport)
        out = memoryview(self._out)
        frames = 0
        for _spec, view in items:
            for offset in range(0, len(view), self._chunk):
                size = self._sealer.seal_into(
                    sealing.DATA, view[offset : offset + self._chunk], out
                )
                transport.send_all_sync(out[:size])
                frames += 1
                # between whole frames only: the sender may then ABORT cleanly
                trio.from_thread.check_cancelled()
        return frames

    async def _ack_writer(self) -> None:
        try:
            async for payload in self._ack_recv:
                async with self._send_lock:
                    await self._write_frame(self._sealer.seal(sealing.ACK, payload))
        except ChannelClosed as exc:
            log.debug("data channel %d: cannot acknowledge: %s", self.number, exc)

    # ------------------------------------------------------------------ reading

    async def _read_header(self, at_boundary: bool) -> tuple[bytes, int, int]:
        header = bytearray(sealing.HEADER.size)
        try:
            await self.transport.receive_into(memoryview(header))
        except EOFError as exc:
            if at_boundary:
                raise
            raise TruncatedTransfer(f"channel ended inside a message: {exc}") from None
        header = bytes(header)
        frame_type, size = sealing.parse_header(header, MAX_FRAME)
        if frame_type != sealing.DATA and size > MAX_CONTROL_FRAME:
            raise IntegrityError(f"control frame of {size} bytes is too large")
        return header, frame_type, size

    async def _read_sealed(self, size: int) -> memoryview:
        if len(self._in) < size:
            self._in = bytearray(size)
        view = memoryview(self._in)[:size]
        try:
            await self.transport.receive_into(view)
        except EOFError as exc:
            raise TruncatedTransfer(f"channel ended inside a frame: {exc}") from None
        self.bytes_received += size
        return view

    async def _read_control(self, size: int, header: bytes) -> Any:
        sealed = await self._read_sealed(size)
        return wire.unpack(self._opener.open(header, sealed))

    async def _read_loop(self) -> None:
        while True:
            header, frame_type, size = await self._read_header(at_boundary=True)
            if frame_type == sealing.CLOSE:
                await self._read_control(size, header) if size > sealing.TAG_BYTES else None
                self.close_reason = "closed by peer"
                return
            if frame_type == sealing.ACK:
                self._on_ack(await self._read_control(size, header))
            elif frame_type == sealing.BEGIN:
                await self._receive_message(await self._read_control(size, header))
            else:
                raise ProtocolError(f"frame type {frame_type} outside a message")

    def _on_ack(self, ack: Any) -> None:
        if not isinstance(ack, dict) or not isinstance(ack.get("i"), int):
            raise ProtocolError("malformed ACK")
        waiting = self._acks.get(ack["i"])
        if waiting is None:
            return  # the sender gave up on it already
        event, slot = waiting
        if ack.get("ok") is True:
            slot.append(None)
        else:
            slot.append(TransferError(f"peer refused the message: {ack.get('why', '?')}"))
        event.set()

    async def _receive_message(self, begin: Any) -> None:
        msg_id, tag, specs = _parse_begin(begin, self._max_message)
        start = time.perf_counter()
        delivery: Delivery = await self._claim(self.peer_id, msg_id, tag, specs)
        try:
            if self.transport.threaded:
                outcome = await trio.to_thread.run_sync(
                    self._receive_payload_sync, msg_id, specs, delivery, limiter=self._limiters[1]
                )
            else:
                outcome = await self._receive_payload(msg_id, specs, delivery)
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                delivery.fail(ChannelClosed("node shutting down"))
            else:
                delivery.fail(exc if isinstance(exc, GossamerError) else TransferError(str(exc)))
            raise
        if outcome is not None:  # the sender aborted
            delivery.fail(TransferError(f"sender aborted the message: {outcome}"))
            return
        if delivery.discard:
            await self._ack_send.send(
                wire.pack({"i": msg_id, "ok": False, "why": delivery.refusal})
            )
            return
        delivery.finish(time.perf_counter() - start, self.path)
        await self._ack_send.send(wire.pack({"i": msg_id, "ok": True}))

    async def _receive_payload(
        self, msg_id: int, specs: list[BufferSpec], delivery: Delivery
    ) -> str | None:
        """Read DATA frames into the delivery's views and check END; the abort reason if any."""
        frames = 0
        scratch = memoryview(bytearray(self._chunk if delivery.discard else 0))
        for index, spec in enumerate(specs):
            view = scratch if delivery.discard else delivery.views[index]
            offset = 0
            while offset < spec.nbytes:
                header, frame_type, size = await self._read_header(at_boundary=False)
                if frame_type == sealing.ABORT:
                    abort = await self._read_control(size, header)
                    return str(abort.get("why", "?")) if isinstance(abort, dict) else "?"
                if frame_type != sealing.DATA:
                    raise ProtocolError(f"frame type {frame_type} inside a message")
                plain = size - sealing.TAG_BYTES
                if plain > spec.nbytes - offset or plain == 0:
                    raise ProtocolError(f"DATA frame overruns buffer {spec.name!r}")
                sealed = await self._read_sealed(size)
                if delivery.discard:
                    if plain > len(scratch):
                        scratch = memoryview(bytearray(plain))
                    # still decrypted: a forged frame must close the channel either way
                    self._opener.open_into(header, sealed, scratch[:plain])
                else:
                    self._opener.open_into(header, sealed, view[offset : offset + plain])
                offset += plain
                frames += 1
        header, frame_type, size = await self._read_header(at_boundary=False)
        end = await self._read_control(size, header)
        return _check_end(frame_type, end, msg_id, frames, specs)

    # The same reading rules, for a worker thread on a direct socket.

    def _read_header_sync(self) -> tuple[bytes, int, int]:
        header = bytearray(sealing.HEADER.size)
        try:
            self.transport.receive_into_sync(memoryview(header))  # type: ignore[attr-defined]
        except EOFError as exc:
            raise TruncatedTransfer(f"channel ended inside a message: {exc}") from None
        frame_type, size = sealing.parse_header(bytes(header), MAX_FRAME)
        if frame_type != sealing.DATA and size > MAX_CONTROL_FRAME:
            raise IntegrityError(f"control frame of {size} bytes is too large")
        return bytes(header), frame_type, size

    def _read_sealed_sync(self, size: int) -> memoryview:
        if len(self._in) < size:
            self._in = bytearray(size)
        view = memoryview(self._in)[:size]
        try:
            self.transport.receive_into_sync(view)  # type: ignore[attr-defined]
        except EOFError as exc:
            raise TruncatedTransfer(f"channel ended inside a frame: {exc}") from None
        self.bytes_received += size
        return view

    def _receive_payload_sync(
        self, msg_id: int, specs: list[BufferSpec], delivery: Delivery
    ) -> str | None:
        """Worker thread: :meth:`_receive_payload` with blocking reads."""
        frames = 0
        scratch = memoryview(bytearray(self._chunk if delivery.discard else 0))
        for index, spec in enumerate(specs):
            view = scratch if delivery.discard else delivery.views[index]
            offset = 0
            while offset < spec.nbytes:
                header, frame_type, size = self._read_header_sync()
                if frame_type == sealing.ABORT:
                    abort = wire.unpack(self._opener.open(header, self._read_sealed_sync(size)))
                    return str(abort.get("why", "?")) if isinstance(abort, dict) else "?"
                if frame_type != sealing.DATA:
                    raise ProtocolError(f"frame type {frame_type} inside a message")
                plain = size - sealing.TAG_BYTES
                if plain > spec.nbytes - offset or plain == 0:
                    raise ProtocolError(f"DATA frame overruns buffer {spec.name!r}")
                sealed = self._read_sealed_sync(size)
                if delivery.discard:
                    if plain > len(scratch):
                        scratch = memoryview(bytearray(plain))
                    self._opener.open_into(header, sealed, scratch[:plain])
                else:
                    self._opener.open_into(header, sealed, view[offset : offset + plain])
                offset += plain
                frames += 1
                trio.from_thread.check_cancelled()
        header, frame_type, size = self._read_header_sync()
        end = wire.unpack(self._opener.open(header, self._read_sealed_sync(size)))
        return _check_end(frame_type, end, msg_id, frames, specs)


def _check_end(
    frame_type: int, end: Any, msg_id: int, frames: int, specs: list[BufferSpec]
) -> str | None:
    """The sender's abort reason, None if END matches what arrived, or raise."""
    if frame_type == sealing.ABORT:
        return str(end.get("why", "?")) if isinstance(end, dict) else "?"
    if frame_type != sealing.END or not isinstance(end, dict):
        raise ProtocolError("message does not finish with END")
    total = sum(spec.nbytes for spec in specs)
    if end.get("i") != msg_id or end.get("f") != frames or end.get("b") != total:
        raise IntegrityError(
            f"END says {end.get('f')} frames / {end.get('b')} bytes, got {frames} / {total}"
        )
    return None


def _parse_begin(begin: Any, max_message: int) -> tuple[int, str, list[BufferSpec]]:
    if not isinstance(begin, dict):
        raise ProtocolError("BEGIN must be a map")
    msg_id, tag, raw_specs = begin.get("i"), begin.get("t"), begin.get("s")
    if not isinstance(msg_id, int) or isinstance(msg_id, bool) or msg_id < 0:
        raise ProtocolError("BEGIN needs an integer message id")
    if not isinstance(tag, str) or not 0 < len(tag) <= 512:
        raise ProtocolError("BEGIN needs a tag of 1-512 characters")
    if not isinstance(raw_specs, list):
        raise ProtocolError("BEGIN needs a list of buffer specs")
    specs = [BufferSpec.from_wire(item) for item in raw_specs]
    if len({s.name for s in specs}) != len(specs):
        raise ProtocolError("buffer names in a message must be unique")
    total = sum(s.nbytes for s in specs)
    if total > max_message:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_message}")
    return msg_id, tag, specs
