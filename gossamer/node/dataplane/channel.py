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

import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from gossamer.node import wire
from gossamer.node.dataplane import sealing
from gossamer.node.dataplane.tensors import BufferSpec
from gossamer.node.dataplane.transports import (
    RECEIVE_SLICE_S,
    STALL_TIMEOUT_S,
    SocketTransport,
    Transport,
)
from gossamer.node.errors import (
    ChannelClosed,
    GossamerError,
    IntegrityError,
    ProtocolError,
    TransferError,
    TruncatedTransfer,
)

log = logging.getLogger(__name__)

MAX_FRAME = 16 << 20  # largest DATA plaintext a receiver accepts
MAX_CONTROL_FRAME = 4 << 20  # BEGIN with many specs stays far below this


class StaleChannel(ChannelClosed):
    """The channel was already dead when a message started: nothing of it was delivered."""


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
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        self.peer_id = peer_id
        # the peer broke the protocol (called with why; the node logs and scores it)
        self._on_violation = on_violation or self._log_violation
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
        # the outgoing frame buffer (a chunk and its seal) is allocated by the first send:
        # a channel that only receives (or that a peer opens and never uses) costs none
        self._out = bytearray(0)
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
            self._on_violation(str(exc))
            self.close_reason = str(exc)
        except (EOFError, ChannelClosed, TruncatedTransfer) as exc:
            # TruncatedTransfer: the peer (or our own shutdown) ended the socket inside a
            # message; the channel is over, which must not take the node down with it.
            log.debug("data channel %d to %s ended: %s", self.number, self.peer_id[-8:], exc)
            self.close_reason = self.close_reason or str(exc)
        except Exception as exc:  # whatever a peer's bytes provoke stays in this channel
            self._on_violation(f"unexpected {type(exc).__name__} while reading it")
            log.debug("the unexpected error", exc_info=True)
            self.close_reason = f"protocol violation ({type(exc).__name__})"

    def _log_violation(self, why: str) -> None:
        log.warning("data channel %d from %s closed: %s", self.number, self.peer_id[-8:], why)

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
            async with self._send_lock, self._send_slot():
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
        verdict = slot[0]  # the first verdict: an ACK, or the close that came before it
        if isinstance(verdict, BaseException):
            raise verdict
        return SendReport(total, time.perf_counter() - start, self.path, frames)

    def _data_frames(self, items: list[tuple[BufferSpec, memoryview]]) -> Iterator[memoryview]:
        """Seal each chunk of every buffer into the one outgoing frame buffer, in order.

        Sans-I/O: the caller writes each frame before asking for the next one.
        """
        # as large as the largest chunk sent so far, not the configured 4 MiB: most channels
        # only ever carry small messages (a state of a few KB, expert batches)
        largest = min(self._chunk, max((len(view) for _spec, view in items), default=0))
        need = sealing.HEADER.size + largest + sealing.TAG_BYTES
        if len(self._out) < need:
            self._out = bytearray(need)
        out = memoryview(self._out)
        for _spec, view in items:
            for offset in range(0, len(view), self._chunk):
                size = self._sealer.seal_into(
                    sealing.DATA, view[offset : offset + self._chunk], out
                )
                yield out[:size]

    async def _send_data(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        frames = 0
        for frame in self._data_frames(items):
            await self._write_frame(frame)
            frames += 1
            # let cancellation and other tasks in between frames
            await trio.lowlevel.checkpoint()
        return frames

    @contextlib.asynccontextmanager
    async def _send_slot(self) -> AsyncIterator[None]:
        """The node's one sending thread slot, taken *before* BEGIN goes out.

        A receiver spends its receiving slot on a message from the moment BEGIN arrives.  When
        the sender wrote BEGIN first and only then waited for its own slot, four nodes could
        wait on each other in a ring (A's thread sends to B, whose slot waits for C's data, C's
        thread sends to D, whose slot waits for A's data): every transfer of the ring stalled
        until the collective's deadline (found by `gossamer bench adversary`, where attempts
        of five members failed together).  Holding the slot from BEGIN to the last DATA frame
        means a receiving slot only ever waits on a sender that is sending to it.
        """
        if not self.transport.threaded:
            yield
            return
        async with self._limiters[0]:
            yield

    async def _send_data_in_thread(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        try:
            # the send slot is held already (_send_slot): a thread from the default pool
            return await trio.to_thread.run_sync(self._send_data_sync, items)
        except ChannelClosed as exc:
            self.close_reason = self.close_reason or str(exc)
            await self._shutdown()
            raise

    def _send_data_sync(self, items: list[tuple[BufferSpec, memoryview]]) -> int:
        """Worker thread: seal and send every DATA frame of a message (send lock held)."""
        transport = self.transport
        assert isinstance(transport, SocketTransport)
        frames = 0
        for frame in self._data_frames(items):
            transport.send_all_sync(frame)
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
        return _parse_frame_header(bytes(header))

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
        return await wire.unpack_async(self._opener.open(header, sealed))

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
        if slot:
            return  # decided already (a second ACK for one message, or the channel closed)
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
                outcome = await self._receive_payload_threaded(msg_id, specs, delivery)
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

    def _payload_parser(
        self, msg_id: int, specs: list[BufferSpec], delivery: Delivery
    ) -> Generator[int | None, Any, str | None]:
        """Sans-I/O reader of a message's DATA frames and END; returns the abort reason if any.

        It yields ``None`` for the next frame header, answered with
        ``(header, type, size)``, and a size for that frame's sealed body,
        answered with a view of exactly those bytes.  The async and the
        worker-thread drivers below only move bytes.
        """
        frames = 0
        scratch = memoryview(bytearray(self._chunk if delivery.discard else 0))
        for index, spec in enumerate(specs):
            view = scratch if delivery.discard else delivery.views[index]
            offset = 0
            while offset < spec.nbytes:
                header, frame_type, size = yield None
                if frame_type == sealing.ABORT:
                    abort = wire.unpack(self._opener.open(header, (yield size)))
                    return str(abort.get("why", "?")) if isinstance(abort, dict) else "?"
                if frame_type != sealing.DATA:
                    raise ProtocolError(f"frame type {frame_type} inside a message")
                plain = size - sealing.TAG_BYTES
                if plain > spec.nbytes - offset or plain == 0:
                    raise ProtocolError(f"DATA frame overruns buffer {spec.name!r}")
                sealed = yield size
                if delivery.discard:
                    if plain > len(scratch):
                        scratch = memoryview(bytearray(plain))
                    # still decrypted: a forged frame must close the channel either way
                    self._opener.open_into(header, sealed, scratch[:plain])
                else:
                    self._opener.open_into(header, sealed, view[offset : offset + plain])
                offset += plain
                frames += 1
        header, frame_type, size = yield None
        end = wire.unpack(self._opener.open(header, (yield size)))
        return _check_end(frame_type, end, msg_id, frames, specs)

    async def _receive_payload(
        self, msg_id: int, specs: list[BufferSpec], delivery: Delivery
    ) -> str | None:
        parser = self._payload_parser(msg_id, specs, delivery)
        request = next(parser)
        while True:
            if request is None:
                reply: Any = await self._read_header(at_boundary=False)
            else:
                reply = await self._read_sealed(request)
            try:
                request = parser.send(reply)
            except StopIteration as done:
                return done.value

    # The same reading, for a worker thread on a direct socket.
    #
    # The node has one receiving thread slot (DataPlane._thread_limiters).  A thread keeps it
    # only while bytes flow and for one slice at most: when the sender pauses it returns to
    # the event loop, which waits for the socket without the slot, and after a slice it queues
    # again behind the node's other receives (trio's limiter is FIFO).  So a sender that
    # stalls inside a message (a hostile peer, a dead one) or trickles (a slow link) costs the
    # node's other receives nothing; a sender silent for the stall timeout is gone.

    async def _receive_payload_threaded(
        self, msg_id: int, specs: list[BufferSpec], delivery: Delivery
    ) -> str | None:
        transport = self.transport
        assert isinstance(transport, SocketTransport)
        parser = self._payload_parser(msg_id, specs, delivery)
        reading = _Reading(next(parser))
        while True:
            async with self._limiters[1]:
                # the slot is held here already: a thread from the default pool
                progressed = await trio.to_thread.run_sync(self._pump_sync, parser, reading)
            if reading.done:
                return reading.result
            if progressed:
                continue  # a full slice: queue again behind the others
            with trio.move_on_after(transport.stall_timeout) as scope:
                await transport.wait_readable()
            if scope.cancelled_caught:
                raise TruncatedTransfer(
                    f"the sender sent nothing for {transport.stall_timeout:g} s inside a message"
                )

    def _pump_sync(self, parser: Generator[int | None, Any, str | None], reading: _Reading) -> bool:
        """Worker thread: feed ``parser`` from the socket until the sender pauses or the slice
        ends; True when it returned after a slice (bytes kept flowing) or finished."""
        transport = self.transport
        assert isinstance(transport, SocketTransport)
        until = time.monotonic() + RECEIVE_SLICE_S
        while True:
            if reading.view is None:
                if reading.request is None:
                    trio.from_thread.check_cancelled()  # a frame boundary
                    reading.start(memoryview(bytearray(sealing.HEADER.size)))
                else:
                    if len(self._in) < reading.request:
                        self._in = bytearray(reading.request)
                    reading.start(memoryview(self._in)[: reading.request])
            assert reading.view is not None
            before = reading.got
            try:
                reading.got = transport.receive_some_into_sync(reading.view, reading.got, until)
            except EOFError as exc:
                where = "a message" if reading.request is None else "a frame"
                raise TruncatedTransfer(f"channel ended inside {where}: {exc}") from None
            if reading.got < len(reading.view):
                # paused (nothing new: False) or out of slice (True)
                return reading.got > before and time.monotonic() >= until
            view, reading.view = reading.view, None
            if reading.request is None:
                reply: Any = _parse_frame_header(bytes(view))
            else:
                self.bytes_received += len(view)
                reply = view
            try:
                reading.request = parser.send(reply)
            except StopIteration as finished:
                reading.done, reading.result = True, finished.value
                return True
            if time.monotonic() >= until:
                return True


@dataclass
class _Reading:
    """Where a threaded receive stands between the worker thread's slices."""

    request: int | None  # the parser's: None for a frame header, else a body's size
    view: memoryview | None = None  # what is being filled
    got: int = 0
    done: bool = False
    result: str | None = None

    def start(self, view: memoryview) -> None:
        self.view, self.got = view, 0


def _parse_frame_header(header: bytes) -> tuple[bytes, int, int]:
    frame_type, size = sealing.parse_header(header, MAX_FRAME)
    if frame_type != sealing.DATA and size > MAX_CONTROL_FRAME:
        raise IntegrityError(f"control frame of {size} bytes is too large")
    return header, frame_type, size


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
