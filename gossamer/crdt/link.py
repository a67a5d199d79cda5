"""A link: one long-lived stream to one peer for one run, and what flows over it.

**Links.**  A link is one long-lived libp2p stream between two members of a
run, carrying frames (:mod:`.protocol`) in both directions; the hello that
opens it is :mod:`.handshake`'s.  Each side then sends the envelopes the
other's state vector lacks — the state-vector exchange on connect.  Every
wait has a deadline: every write (``write_timeout`` plus size at 1 MiB/s) and
the read side (``idle_timeout``; a link sends ``PING`` after ``keepalive`` s
of silence).

A link keeps a lower bound of what its peer holds (from the hello, the
envelopes it sent us, those we sent it and its ``HAVE`` announcements), so
flooding (:mod:`.mesh`) offers it only what it lacks, and its writer drops a
queued envelope the peer has meanwhile received another way.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from gossamer.crdt.envelope import Envelope, envelope_from_wire
from gossamer.crdt.protocol import (
    CHARTER,
    ENVELOPE,
    ERROR,
    HAVE,
    PENALTY_FORBIDDEN,
    PENALTY_MALFORMED,
    PING,
    SV_REPLY,
    SV_REQUEST,
    check_nonce,
    check_sv,
    decode_message,
    error_message,
)
from gossamer.crdt.replica import Receipt, Severity, Verdict
from gossamer.node import FrameTooLarge, ProtocolError, wire

if TYPE_CHECKING:
    from gossamer.crdt.run import Run
    from gossamer.node import Stream

log = logging.getLogger(__name__)


class Link:
    """One stream to one peer for one run; sends through a queue drained by one writer."""

    def __init__(self, run: Run, stream: Stream, reader: wire.FrameReader, initiator: bool) -> None:
        self.run = run
        self.stream = stream
        self.reader = reader
        self.peer_id = stream.peer_id
        self.initiator = initiator  # we dialed
        self.known: dict[int, int] = {}
        self.keys_sent: set[int] = set()
        self.announced: dict[int, int] = {}
        self.hello_sv: dict[int, int] = {}
        # Queue items: (frame, client, end) — client/end set for envelopes, so the
        # writer can drop one the peer has meanwhile shown it holds.
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, int, int]](math.inf)
        self.peer_has: dict[int, int] = {}  # what the peer itself told us it holds
        self.queued_bytes = 0
        self.closed = False
        self.cancel_scope = trio.CancelScope()
        self.drained = trio.Event()
        self.waiters: dict[int, trio.Event] = {}
        self.last_sent = self.run.monotonic()
        self.last_gap_request = 0.0
        self.opened = self.run.monotonic()

    def offer(self, envelope: Envelope, *, lazy: bool = False) -> bool:
        """Queue ``envelope`` unless the peer is known to have its clocks.

        With ``lazy`` (flooding) an envelope larger than ``lazy_push_bytes`` is
        only announced (HAVE); the peer pulls it if nobody else sent it first.
        """
        client = envelope.client
        end = envelope.span[1]
        if self.known.get(client, 0) >= end:
            return False
        if lazy and len(envelope.update) > self.run.options.lazy_push_bytes:
            if self.announced.get(client, 0) < end:
                self.announced[client] = end
                self.send_raw(wire.frame(wire.pack([HAVE, client, end])))
            return True
        self.known[client] = end
        self.send_envelope(envelope)
        return True

    def send_envelope(self, envelope: Envelope, *, skippable: bool = True) -> None:
        client = envelope.client
        include_key = client not in self.keys_sent
        self.keys_sent.add(client)
        frame = wire.frame(envelope.to_wire(include_key))
        stats = self.run.stats
        stats["envelopes_sent"] += 1
        stats["envelope_bytes_sent"] += len(frame)
        stats["update_bytes_sent"] += len(envelope.update)
        self.send_raw(frame, client if skippable else -1, envelope.span[1])

    def send_raw(self, data: bytes, client: int = -1, end: int = 0) -> None:
        if self.closed:
            return
        if self.queued_bytes + len(data) > self.run.options.send_queue_bytes:
            log.info("crdt: send queue to %s over its limit; closing the link", self.peer_id[-8:])
            self.close()
            return
        self.queued_bytes += len(data)
        try:
            self._send.send_nowait((data, client, end))
        except trio.ClosedResourceError:
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self.cancel_scope.cancel()

    def finish(self, code: str, text: str) -> None:
        """Send what is queued plus an ERROR, then close (the peer closes its end on ERROR)."""
        if self.closed:
            return
        self.send_raw(error_message(code, text))
        self.closed = True
        self._send.close()
        self.run.nursery.start_soon(self._close_later, 2.0)

    async def _close_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self.cancel_scope.cancel()

    async def writer(self) -> None:
        options = self.run.options
        async for data, client, end in self._recv:
            if client >= 0 and self.peer_has.get(client, 0) >= end:
                self.queued_bytes -= len(data)  # it reached the peer another way meanwhile
                self.run.stats["envelopes_skipped"] += 1
                continue
            # Shielded: cancelling a write half-way through would leave a torn
            # yamux frame on the connection and kill it for every protocol.
            # The deadline still bounds it (a stuck peer loses its connection).
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + options.write_timeout + len(data) / (1 << 20)
                await self.stream.write(data)
            if scope.cancelled_caught:
                raise trio.TooSlowError
            self.queued_bytes -= len(data)
            self.last_sent = self.run.monotonic()

    async def keepalive(self) -> None:
        interval = self.run.options.keepalive
        while True:
            await trio.sleep(interval / 2)
            if self.run.monotonic() - self.last_sent >= interval and not self.queued_bytes:
                self.send_raw(wire.frame(wire.pack([PING])))

    # ------------------------------------------------------------ serving

    async def serve(
        self, peer_sv: dict[int, int], task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the link after a successful hello until either side closes it."""
        run = self.run
        peer = self.peer_id
        if not run.service.may_talk(peer):  # banned or filtered during the hello
            self.closed = True
            task_status.started()
            with trio.CancelScope(shield=True):
                await self.stream.reset()
            return
        run.links.setdefault(peer, []).append(self)
        self.hello_sv = dict(peer_sv)
        self.known = dict(peer_sv)
        self.peer_has = dict(peer_sv)
        for envelope in run.replica.missing_for(peer_sv):
            self.offer(envelope)
        log.debug("run %s: linked with %s", run.run_id, peer[-8:])
        task_status.started()
        run.notify_change()
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard_writer)
                    nursery.start_soon(self.keepalive)
                    await self._read_loop()
                    # Let queued frames (an ERROR, say) go out before closing.
                    self._send.close()
                    with trio.move_on_after(1.0):
                        await self.drained.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            links = run.links.get(peer, [])
            if self in links:
                links.remove(self)
            if not links:
                run.links.pop(peer, None)
            for event in self.waiters.values():
                event.set()
            with trio.CancelScope(shield=True):
                await self.stream.close()

    async def _guard_writer(self) -> None:
        try:
            await self.writer()
        except (ConnectionError, trio.TooSlowError) as exc:
            log.info("crdt: writing to %s failed (%r); closing the link", self.peer_id[-8:], exc)
            self.close()
        except trio.ClosedResourceError:
            pass
        finally:
            self.drained.set()

    async def _read_loop(self) -> None:
        options = self.run.options
        service = self.run.service
        while True:
            try:
                with trio.move_on_after(options.idle_timeout) as scope:
                    payload = await self.reader.read_frame(options.max_frame_bytes, "crdt message")
            except FrameTooLarge as exc:
                service.penalise(self.peer_id, PENALTY_FORBIDDEN, str(exc))
                return
            except (ConnectionError, EOFError):
                return
            if scope.cancelled_caught:
                log.info(
                    "crdt: %s silent for %.0f s; closing", self.peer_id[-8:], options.idle_timeout
                )
                return
            if payload is None:
                return
            try:
                # decoded within the message budgets, off the event loop when it is large
                self._dispatch(await decode_message(payload))
            except ProtocolError as exc:
                service.penalise(self.peer_id, PENALTY_FORBIDDEN, f"protocol error: {exc}")
                self.send_raw(error_message("protocol", "malformed or forbidden message"))
                return
            if self.closed:
                return

    # ----------------------------------------------------------- receiving

    def _dispatch(self, msg: list[Any]) -> None:
        run = self.run
        kind = msg[0]
        if kind == ENVELOPE:
            self._on_envelope(envelope_from_wire(msg, run.replica.author_key))
        elif kind == SV_REQUEST:
            if len(msg) != 3:
                raise ProtocolError("SV_REQUEST is [2, nonce, state vector]")
            nonce, sv = check_nonce(msg[1]), check_sv(msg[2])
            self._merge_known(sv)
            for envelope in run.replica.missing_for(sv):
                self.offer(envelope)
            self.send_raw(wire.frame(wire.pack([SV_REPLY, nonce, run.replica.state_vector()])))
        elif kind == SV_REPLY:
            if len(msg) != 3:
                raise ProtocolError("SV_REPLY is [3, nonce, state vector]")
            nonce, sv = check_nonce(msg[1]), check_sv(msg[2])
            self._merge_known(sv)
            for envelope in run.replica.missing_for(sv):
                self.offer(envelope)
            event = self.waiters.pop(nonce, None)
            if event is not None:
                event.set()
        elif kind == CHARTER:
            if len(msg) != 2 or not isinstance(msg[1], bytes):
                raise ProtocolError("CHARTER is [4, charter]")
            run.consider_charter(msg[1], self.peer_id)
        elif kind == HAVE:
            if len(msg) != 3 or not all(isinstance(x, int) for x in msg[1:]):
                raise ProtocolError("HAVE is [7, client, clock]")
            client, end = check_sv({msg[1]: msg[2]}).popitem()
            self._merge_known({client: end})
            run.mesh.maybe_pull(self, client, end)
        elif kind == PING:
            pass
        elif kind == ERROR:
            log.info("crdt: %s closed the link: %s", self.peer_id[-8:], msg[1:3])
            self.close()
        else:
            raise ProtocolError(f"unknown crdt message type {kind}")

    def _merge_known(self, sv: dict[int, int]) -> None:
        for table in (self.known, self.peer_has):
            for client, clock in sv.items():
                if clock > table.get(client, 0):
                    table[client] = clock

    def _on_envelope(self, envelope: Envelope) -> None:
        run = self.run
        run.stats["received"] += 1
        receipt = run.replica.receive(envelope, source=self)
        verdict = receipt.verdict
        if verdict is Verdict.REFUSED:
            self.punish(receipt)
            return
        client = envelope.client
        end = envelope.span[1]
        if end > self.known.get(client, 0):
            self.known[client] = end
        if end > self.peer_has.get(client, 0):
            self.peer_has[client] = end
        if verdict is Verdict.DUPLICATE:
            run.stats["duplicates"] += 1
        elif verdict is Verdict.PENDING:
            run.stats["pending"] += 1
            now = self.run.monotonic()
            if now - self.last_gap_request >= run.options.gap_request_interval:
                self.last_gap_request = now
                self.send_raw(wire.frame(wire.pack([SV_REQUEST, 0, run.replica.state_vector()])))

    def punish(self, receipt: Receipt) -> None:
        """Charge this link's peer for an envelope the replica refused."""
        run = self.run
        run.stats["refused"] += 1
        envelope = receipt.envelope
        author = envelope.author_peer_id[-8:] if envelope is not None else "?"
        log.warning(
            "run %s: refused an update by %s from %s: %s",
            run.run_id,
            author,
            self.peer_id[-8:],
            receipt.reason,
        )
        if receipt.severity is Severity.MALFORMED:
            run.service.penalise(self.peer_id, PENALTY_MALFORMED, receipt.reason)
        elif receipt.severity is Severity.FORBIDDEN:
            run.service.penalise(self.peer_id, PENALTY_FORBIDDEN, receipt.reason)
