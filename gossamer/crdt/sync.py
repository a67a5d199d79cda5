"""Replicating run documents between nodes over ``/gossamer/crdt/1.0.0``.

One :class:`CrdtService` per node serves every run the node takes part in;
each run is a :class:`Run` (its replica, its persistent store, its links).

**Links.**  A link is one long-lived libp2p stream between two members of a
run, carrying length-prefixed msgpack frames (limit: the largest update plus
4 KiB) in both directions.  The dialer sends ``HELLO``, the listener answers
with its own ``HELLO`` or an ``ERROR`` (unknown run, not admitted, banned).
Each side then sends the envelopes the other's state vector lacks — the
state-vector exchange on connect.  Every wait has a deadline: the hello
(``hello_timeout``), every write (``write_timeout`` plus size at 1 MiB/s), and
the read side (``idle_timeout``; a link sends ``PING`` after ``keepalive`` s
of silence).

**Push.**  A node links to ``mesh_low``–``mesh_high`` members (picked at random
from the member records, which carry addresses).  A new envelope — written
here or received and accepted — is forwarded to every linked peer except the
one it came from and those known to have it (each link tracks a lower bound
of the peer's state vector from its hello, the envelopes it sent us and the
envelopes we sent it).  So an update floods the mesh once, hop by hop, rather
than going one-to-all from its author; duplicates stop at the first replica
that already has the clocks.  Envelopes over ``lazy_push_bytes`` (64 KiB) are
announced instead (``HAVE``) and pulled by the first neighbour to hear of them,
so a 5 MB update crosses each node about once rather than once per link.

**Anti-entropy.**  Every ``anti_entropy_interval`` (±20 %), a node picks a
random member — linked or not, so a partition heals even when the mesh lies
on one side of it — and does a push-pull exchange: ``SV_REQUEST`` with its
state vector, the peer answers with what we lack then ``SV_REPLY`` with its
own, and we send what it lacks.  Whatever arrives is new to our mesh and gets
flooded.  A receiver that sees a gap (an envelope whose author's earlier
clocks are missing) parks it and asks the sender with ``SV_REQUEST`` at once.

**Penalties.**  A refused envelope or a malformed message costs the *sending*
peer points (malformed or forged: 100, a rule violation or protocol error:
50); at 100 the peer is banned for ``ban_seconds`` — its links close and its
hellos are refused.

Messages (msgpack arrays)::

    [0, 1, run_id, charter|nil, state_vector]   HELLO (first frame each way)
    [1, key|nil, signature, update]             ENVELOPE (envelope.py)
    [2, nonce, state_vector]                    SV_REQUEST: send me what I lack, then reply
    [3, nonce, state_vector]                    SV_REPLY
    [4, charter]                                CHARTER (a newer version)
    [5]                                         PING
    [6, code, text]                             ERROR, then the sender closes
    [7, client, clock]                          HAVE: I hold that author up to that clock

A state vector is a map {client id: clock}.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossamer.crdt.charter import Charter, CharterError, check_run_id
from gossamer.crdt.document import RunDocument
from gossamer.crdt.envelope import Envelope, envelope_from_wire
from gossamer.crdt.replica import Limits, Receipt, Replica, Severity, Verdict
from gossamer.crdt.store import RunStore
from gossamer.node import wire
from gossamer.node.errors import (
    FrameTooLarge,
    GossamerError,
    PeerUnreachable,
    ProtocolError,
)

if TYPE_CHECKING:
    from gossamer.node._libp2p_compat import Stream
    from gossamer.node.node import Node

log = logging.getLogger("gossamer.crdt.sync")

PROTOCOL = "/gossamer/crdt/1.0.0"
PROTOCOL_VERSION = 1

HELLO, ENVELOPE, SV_REQUEST, SV_REPLY, CHARTER, PING, ERROR, HAVE = range(8)
MAX_HELLO_BYTES = 4 << 20
MAX_SV_ENTRIES = 100_000

PENALTY_MALFORMED = 100
PENALTY_FORBIDDEN = 50
BAN_SCORE = 100


class RunAccessError(GossamerError):
    """A peer refused us access to a run (unknown run, not admitted, banned)."""


@dataclass
class SyncOptions:
    mesh_low: int = 4
    mesh_high: int = 8
    anti_entropy_interval: float = 10.0
    heartbeat_interval: float = 30.0  # 0: no automatic heartbeats
    maintain_interval: float = 1.0
    hello_timeout: float = 5.0
    keepalive: float = 15.0
    idle_timeout: float = 60.0
    write_timeout: float = 10.0
    send_queue_bytes: int = 256 << 20
    checkpoint_every: int = 128
    lazy_push_bytes: int = 64 << 10  # larger envelopes are announced, then pulled
    pull_timeout: float = 5.0
    gap_request_interval: float = 0.5
    ban_seconds: float = 600.0
    dial_backoff: float = 5.0
    stale_member_s: float = 300.0
    limits: Limits = field(default_factory=Limits)

    @property
    def max_frame_bytes(self) -> int:
        return self.limits.max_update_bytes + 4096


# ------------------------------------------------------------------ messages


def _check_sv(obj: Any) -> dict[int, int]:
    if not isinstance(obj, dict) or len(obj) > MAX_SV_ENTRIES:
        raise ProtocolError("a state vector is a map of at most 100k entries")
    for client, clock in obj.items():
        if (
            not isinstance(client, int)
            or isinstance(client, bool)
            or not 0 <= client < 2**53
            or not isinstance(clock, int)
            or isinstance(clock, bool)
            or not 0 <= clock < 2**53
        ):
            raise ProtocolError("state vector entries are {client id: clock} integers")
    return obj


def _check_nonce(obj: Any) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not 0 <= obj < 2**63:
        raise ProtocolError("nonce must be a non-negative integer")
    return obj


def parse_hello(payload: bytes) -> tuple[str, bytes | None, dict[int, int] | None]:
    """(run id, charter blob or None, state vector) of a HELLO; ProtocolError if malformed.

    A nil state vector asks only for the charter: the listener answers its
    HELLO and closes (how a joiner learns the charter of a run id).
    """
    msg = wire.unpack(payload)
    if not isinstance(msg, list) or len(msg) != 5 or msg[0] != HELLO:
        raise ProtocolError("expected HELLO [0, version, run, charter, state vector]")
    _, version, run_id, charter, sv = msg
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"crdt protocol version {version!r} is not {PROTOCOL_VERSION}")
    if not isinstance(run_id, str):
        raise ProtocolError("run id must be a string")
    try:
        check_run_id(run_id)
    except CharterError as exc:
        raise ProtocolError(str(exc)) from None
    if charter is not None and not isinstance(charter, bytes):
        raise ProtocolError("charter must be bytes or nil")
    return run_id, charter, None if sv is None else _check_sv(sv)


def hello_message(run_id: str, charter: Charter | None, sv: dict[int, int] | None) -> bytes:
    return wire.frame(
        wire.pack([HELLO, PROTOCOL_VERSION, run_id, charter.encode() if charter else None, sv])
    )


def error_message(code: str, text: str) -> bytes:
    return wire.frame(wire.pack([ERROR, code, text[:500]]))


# --------------------------------------------------------------------- links


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
        self.last_sent = time.monotonic()
        self.last_gap_request = 0.0
        self.opened = time.monotonic()

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
            self.last_sent = time.monotonic()

    async def keepalive(self) -> None:
        interval = self.run.options.keepalive
        while True:
            await trio.sleep(interval / 2)
            if time.monotonic() - self.last_sent >= interval and not self.queued_bytes:
                self.send_raw(wire.frame(wire.pack([PING])))


# ---------------------------------------------------------------------- runs


class Run:
    """A run this node replicates: the document plus its links and background work."""

    def __init__(
        self,
        service: CrdtService,
        charter: Charter,
        store: RunStore | None,
        bootstrap: list[str] | None = None,
    ) -> None:
        self.service = service
        self.node = service.node
        self.options = service.options
        self.replica = Replica(charter, self.node.identity, self.options.limits)
        self.doc = RunDocument(self.replica)
        self.store = store
        self.links: dict[str, list[Link]] = {}
        self.bootstrap_peers: set[str] = set(bootstrap or ())
        self.joined = False
        self.role = "worker"
        self._dialing: set[str] = set()
        self._dial_failed: dict[str, float] = {}
        self._cancel = trio.CancelScope()
        self._change_waiters: set[trio.Event] = set()
        self._dial_events: dict[str, trio.Event] = {}
        self._pulls: dict[tuple[int, int], float] = {}
        self._next_anti_entropy = time.monotonic() + self._ae_delay()
        self._next_heartbeat = 0.0
        self.anti_entropy_rounds = 0
        self.stats: dict[str, int] = {
            "received": 0,
            "applied": 0,
            "duplicates": 0,
            "pending": 0,
            "refused": 0,
            "sent": 0,
            "envelopes_skipped": 0,  # dropped from a send queue: the peer got it elsewhere
            "envelopes_sent": 0,  # on the wire, including replies to state vectors
            "envelope_bytes_sent": 0,  # frames of envelopes
            "update_bytes_sent": 0,  # the pycrdt updates inside them
        }
        if store is not None:
            applied = self.replica.load(store.load())
            if applied:
                log.info("run %s: reloaded %d updates from disk", self.run_id, applied)
            self.replica.persist = store.append
            store.save_charter(charter)
        self.replica.add_listener(self._on_receipt)

    @property
    def run_id(self) -> str:
        return self.replica.run_id

    @property
    def charter(self) -> Charter:
        return self.replica.charter

    def _ae_delay(self) -> float:
        return self.options.anti_entropy_interval * random.uniform(0.8, 1.2)

    # ---------------------------------------------------------- lifecycle

    async def _main(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                nursery.start_soon(self._maintain)
                await trio.sleep_forever()

    def close(self) -> None:
        for links in list(self.links.values()):
            for link in links:
                link.close()
        self._cancel.cancel()
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------ links

    def linked_peers(self) -> list[str]:
        return [p for p, links in self.links.items() if any(not lk.closed for lk in links)]

    def link_for(self, peer_id: str) -> Link | None:
        for link in self.links.get(peer_id, ()):
            if not link.closed:
                return link
        return None

    async def link_to(self, peer_id: str) -> Link:
        """A link to ``peer_id`` (existing or new); RunAccessError/PeerUnreachable on failure."""
        while True:
            link = self.link_for(peer_id)
            if link is not None:
                return link
            pending = self._dial_events.get(peer_id)
            if pending is None:
                break
            await pending.wait()
            if self.link_for(peer_id) is None:
                break  # that dial failed: try ourselves
        event = self._dial_events[peer_id] = trio.Event()
        try:
            return await self._link_to(peer_id)
        finally:
            # Several waiters of a failed dial may each have started their own: remove only
            # ours (a KeyError here used to take the whole run down with it).
            if self._dial_events.get(peer_id) is event:
                del self._dial_events[peer_id]
            event.set()

    async def _link_to(self, peer_id: str) -> Link:
        if peer_id == self.node.peer_id:
            raise GossamerError("cannot link to ourselves")
        if not self.service.may_talk(peer_id):
            raise RunAccessError(f"{peer_id[-8:]} is banned or filtered")
        stream = await self.node.open_stream(peer_id, PROTOCOL)
        reader = wire.FrameReader(stream)
        try:
            with trio.fail_after(self.options.hello_timeout):
                await stream.write(
                    hello_message(self.run_id, self.charter, self.replica.state_vector())
                )
                payload = await reader.read_frame(MAX_HELLO_BYTES, "crdt hello")
        except (trio.TooSlowError, ConnectionError, EOFError, FrameTooLarge) as exc:
            await stream.reset()
            raise PeerUnreachable(f"crdt hello to {peer_id[-8:]} failed: {exc!r}") from None
        if payload is None:
            await stream.reset()
            raise PeerUnreachable(f"{peer_id[-8:]} closed the crdt stream during the hello")
        try:
            msg = wire.unpack(payload)
            if isinstance(msg, list) and msg and msg[0] == ERROR:
                raise RunAccessError(f"{peer_id[-8:]} refused run {self.run_id}: {msg[1:3]}")
            run_id, charter_blob, sv = parse_hello(payload)
            if run_id != self.run_id or sv is None:
                raise ProtocolError("hello answered for another run or without a state vector")
        except (ProtocolError, RunAccessError) as exc:
            await stream.reset()
            if isinstance(exc, ProtocolError):
                self.service.penalise(peer_id, PENALTY_FORBIDDEN, f"bad hello: {exc}")
            raise
        if charter_blob is not None:
            self.consider_charter(charter_blob, peer_id)
        if not self.charter.may_join(peer_id):
            await stream.reset()
            raise RunAccessError(f"{peer_id[-8:]} is not admitted to run {self.run_id}")
        link = Link(self, stream, reader, initiator=True)
        await self.nursery.start(self._serve_link, link, sv)
        if link.closed:
            raise RunAccessError(f"{peer_id[-8:]} is banned or filtered")
        return link

    async def _serve_link(
        self, link: Link, peer_sv: dict[int, int], task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        peer = link.peer_id
        if not self.service.may_talk(peer):  # banned or filtered during the hello
            link.closed = True
            task_status.started()
            with trio.CancelScope(shield=True):
                await link.stream.reset()
            return
        self.links.setdefault(peer, []).append(link)
        link.hello_sv = dict(peer_sv)
        link.known = dict(peer_sv)
        link.peer_has = dict(peer_sv)
        for envelope in self.replica.missing_for(peer_sv):
            link.offer(envelope)
        log.debug("run %s: linked with %s", self.run_id, peer[-8:])
        task_status.started()
        self._notify_change()
        try:
            with link.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard_writer, link)
                    nursery.start_soon(link.keepalive)
                    await self._read_loop(link)
                    # Let queued frames (an ERROR, say) go out before closing.
                    link._send.close()
                    with trio.move_on_after(1.0):
                        await link.drained.wait()
                    nursery.cancel_scope.cancel()
        finally:
            link.closed = True
            links = self.links.get(peer, [])
            if link in links:
                links.remove(link)
            if not links:
                self.links.pop(peer, None)
            for event in link.waiters.values():
                event.set()
            with trio.CancelScope(shield=True):
                await link.stream.close()

    async def _guard_writer(self, link: Link) -> None:
        try:
            await link.writer()
        except (ConnectionError, trio.TooSlowError) as exc:
            log.info("crdt: writing to %s failed (%r); closing the link", link.peer_id[-8:], exc)
            link.close()
        except trio.ClosedResourceError:
            pass
        finally:
            link.drained.set()

    async def _read_loop(self, link: Link) -> None:
        options = self.options
        while True:
            try:
                with trio.move_on_after(options.idle_timeout) as scope:
                    payload = await link.reader.read_frame(options.max_frame_bytes, "crdt message")
            except FrameTooLarge as exc:
                self.service.penalise(link.peer_id, PENALTY_FORBIDDEN, str(exc))
                return
            except (ConnectionError, EOFError):
                return
            if scope.cancelled_caught:
                log.info(
                    "crdt: %s silent for %.0f s; closing", link.peer_id[-8:], options.idle_timeout
                )
                return
            if payload is None:
                return
            try:
                self._dispatch(link, payload)
            except ProtocolError as exc:
                self.service.penalise(link.peer_id, PENALTY_FORBIDDEN, f"protocol error: {exc}")
                link.send_raw(error_message("protocol", str(exc)))
                return
            if link.closed:
                return

    # ------------------------------------------------------------- messages

    def _dispatch(self, link: Link, payload: bytes) -> None:
        msg = wire.unpack(payload, max_container=MAX_SV_ENTRIES)
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
            raise ProtocolError("a crdt message is a list starting with its type")
        kind = msg[0]
        if kind == ENVELOPE:
            self._on_envelope(link, envelope_from_wire(msg, self.replica.author_key))
        elif kind == SV_REQUEST:
            if len(msg) != 3:
                raise ProtocolError("SV_REQUEST is [2, nonce, state vector]")
            nonce, sv = _check_nonce(msg[1]), _check_sv(msg[2])
            self._merge_known(link, sv)
            for envelope in self.replica.missing_for(sv):
                link.offer(envelope)
            link.send_raw(wire.frame(wire.pack([SV_REPLY, nonce, self.replica.state_vector()])))
        elif kind == SV_REPLY:
            if len(msg) != 3:
                raise ProtocolError("SV_REPLY is [3, nonce, state vector]")
            nonce, sv = _check_nonce(msg[1]), _check_sv(msg[2])
            self._merge_known(link, sv)
            for envelope in self.replica.missing_for(sv):
                link.offer(envelope)
            event = link.waiters.pop(nonce, None)
            if event is not None:
                event.set()
        elif kind == CHARTER:
            if len(msg) != 2 or not isinstance(msg[1], bytes):
                raise ProtocolError("CHARTER is [4, charter]")
            self.consider_charter(msg[1], link.peer_id)
        elif kind == HAVE:
            if len(msg) != 3 or not all(isinstance(x, int) for x in msg[1:]):
                raise ProtocolError("HAVE is [7, client, clock]")
            client, end = _check_sv({msg[1]: msg[2]}).popitem()
            self._merge_known(link, {client: end})
            self._maybe_pull(link, client, end)
        elif kind == PING:
            pass
        elif kind == ERROR:
            log.info("crdt: %s closed the link: %s", link.peer_id[-8:], msg[1:3])
            link.close()
        else:
            raise ProtocolError(f"unknown crdt message type {kind}")

    def _maybe_pull(self, link: Link, client: int, end: int) -> None:
        """A peer announced clocks we lack: ask it, unless we asked someone recently."""
        if self.replica.clock_of(client) >= end:
            return
        now = time.monotonic()
        asked = self._pulls.get((client, end))
        if asked is not None and now - asked < self.options.pull_timeout:
            return
        if len(self._pulls) > 10_000:
            self._pulls.clear()
        self._pulls[(client, end)] = now
        link.send_raw(wire.frame(wire.pack([SV_REQUEST, 0, self.replica.state_vector()])))

    def _merge_known(self, link: Link, sv: dict[int, int]) -> None:
        for table in (link.known, link.peer_has):
            for client, clock in sv.items():
                if clock > table.get(client, 0):
                    table[client] = clock

    def _on_envelope(self, link: Link, envelope: Envelope) -> None:
        self.stats["received"] += 1
        receipt = self.replica.receive(envelope, source=link)
        verdict = receipt.verdict
        if verdict is Verdict.REFUSED:
            self._punish(link.peer_id, receipt)
            return
        client = envelope.client
        end = envelope.span[1]
        if end > link.known.get(client, 0):
            link.known[client] = end
        if end > link.peer_has.get(client, 0):
            link.peer_has[client] = end
        if verdict is Verdict.DUPLICATE:
            self.stats["duplicates"] += 1
        elif verdict is Verdict.PENDING:
            self.stats["pending"] += 1
            now = time.monotonic()
            if now - link.last_gap_request >= self.options.gap_request_interval:
                link.last_gap_request = now
                link.send_raw(wire.frame(wire.pack([SV_REQUEST, 0, self.replica.state_vector()])))

    def _punish(self, peer_id: str, receipt: Receipt) -> None:
        self.stats["refused"] += 1
        envelope = receipt.envelope
        author = envelope.author_peer_id[-8:] if envelope is not None else "?"
        log.warning(
            "run %s: refused an update by %s from %s: %s",
            self.run_id,
            author,
            peer_id[-8:],
            receipt.reason,
        )
        if receipt.severity is Severity.MALFORMED:
            self.service.penalise(peer_id, PENALTY_MALFORMED, receipt.reason)
        elif receipt.severity is Severity.FORBIDDEN:
            self.service.penalise(peer_id, PENALTY_FORBIDDEN, receipt.reason)

    def _on_receipt(self, receipt: Receipt, source: Any) -> None:
        """Replica listener: flood what is new to the mesh; penalise refusals found later."""
        if receipt.verdict is Verdict.REFUSED:
            if isinstance(source, Link):
                self._punish(source.peer_id, receipt)
            return
        if receipt.verdict not in (Verdict.APPLIED, Verdict.STORED):
            return
        envelope = receipt.envelope
        assert envelope is not None
        if receipt.verdict is Verdict.APPLIED:
            self.stats["applied"] += 1
        exclude = source.peer_id if isinstance(source, Link) else None
        for peer, links in list(self.links.items()):
            if peer == exclude:
                continue
            link = next((lk for lk in links if not lk.closed), None)
            if link is None:
                continue
            if receipt.verdict is Verdict.STORED:
                # a checkpoint: the peer holds the clocks but may compact its log too
                link.send_envelope(envelope, skippable=False)
                self.stats["sent"] += 1
            elif link.offer(envelope, lazy=True):
                self.stats["sent"] += 1
        self._notify_change()
        if source is None and receipt.verdict is Verdict.APPLIED:
            self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        if self.replica.own_log_length() >= self.options.checkpoint_every:
            envelope = self.replica.make_checkpoint()
            if envelope is not None:
                log.debug("run %s: checkpoint of our %d clocks", self.run_id, envelope.span[1])

    def consider_charter(self, blob: bytes, from_peer: str) -> bool:
        """Adopt a newer valid charter for this run; penalise a forged one."""
        try:
            charter = Charter.decode(blob, self.run_id)
        except CharterError as exc:
            self.service.penalise(from_peer, PENALTY_MALFORMED, f"bad charter: {exc}")
            return False
        if not self.replica.set_charter(charter):
            return False
        log.info("run %s: adopted charter version %d", self.run_id, charter.version)
        if self.store is not None:
            self.store.save_charter(charter)
        self._broadcast_charter()
        self._enforce_access()
        self._notify_change()
        return True

    def update_charter(self, charter: Charter) -> None:
        """Adopt a charter we signed (see Charter.amend) and tell the mesh."""
        if not self.replica.set_charter(charter):
            raise GossamerError("the charter must be for this run and of a higher version")
        if self.store is not None:
            self.store.save_charter(charter)
        self._broadcast_charter()
        self._enforce_access()
        self._notify_change()

    def _broadcast_charter(self) -> None:
        blob = wire.frame(wire.pack([CHARTER, self.charter.encode()]))
        for peer in self.linked_peers():
            link = self.link_for(peer)
            if link is not None:
                link.send_raw(blob)

    def _enforce_access(self) -> None:
        for peer, links in list(self.links.items()):
            if not self.charter.may_join(peer):
                for link in links:
                    link.finish("not_admitted", "removed from the run")

    # ------------------------------------------------------- anti-entropy

    def candidates(self) -> list[str]:
        """Peers we could sync with: live members, bootstrap peers and linked peers.

        A member whose last heartbeat is older than ``stale_member_s`` is
        skipped (it probably left without saying so); one that never sent a
        heartbeat is kept.
        """
        me = self.node.peer_id
        now = time.time()
        stale = self.options.stale_member_s
        members = {
            p
            for p, m in self.doc.members().items()
            if m.heartbeat is None or now - m.heartbeat < stale
        }
        peers = members | self.bootstrap_peers | set(self.linked_peers())
        return sorted(
            p for p in peers if p != me and self.service.may_talk(p) and self.charter.may_join(p)
        )

    async def anti_entropy_once(
        self, peer_id: str | None = None, timeout: float = 10.0
    ) -> str | None:
        """One push-pull exchange with ``peer_id`` (default: a random member); returns the peer."""
        if peer_id is None:
            choices = self.candidates()
            if not choices:
                return None
            peer_id = random.choice(choices)
        self.anti_entropy_rounds += 1
        with trio.move_on_after(timeout):
            self._learn_addrs(peer_id)
            try:
                link = await self.link_to(peer_id)
            except GossamerError as exc:
                log.debug("anti-entropy with %s: %s", peer_id[-8:], exc)
                self._dial_failed[peer_id] = time.monotonic()
                return None
            nonce = random.getrandbits(62) + 1
            event = trio.Event()
            link.waiters[nonce] = event
            link.send_raw(wire.frame(wire.pack([SV_REQUEST, nonce, self.replica.state_vector()])))
            await event.wait()
        return peer_id

    def _learn_addrs(self, peer_id: str) -> None:
        member = self.doc.member(peer_id)
        if member is not None and member.addrs:
            self.node.peers.add_addrs(peer_id, list(member.addrs))

    # --------------------------------------------------------- maintenance

    async def _maintain(self) -> None:
        while True:
            try:
                self._maintain_once()
            except Exception:
                log.exception("run %s: maintenance failed", self.run_id)
            await trio.sleep(self.options.maintain_interval * random.uniform(0.8, 1.2))

    def _maintain_once(self) -> None:
        now = time.monotonic()
        if not self.charter.may_join(self.node.peer_id):
            return  # removed from the run: nothing to sync, nobody to dial
        self._close_duplicate_links()
        self._trim_mesh()
        linked = set(self.linked_peers())
        want = self.options.mesh_low - len(linked) - len(self._dialing)
        if want > 0:
            fresh = [
                p
                for p in self.candidates()
                if p not in linked
                and p not in self._dialing
                and now - self._dial_failed.get(p, -1e9) >= self.options.dial_backoff
            ]
            random.shuffle(fresh)
            for peer in fresh[:want]:
                self._dialing.add(peer)
                self.nursery.start_soon(self._dial_member, peer)
        if self.options.anti_entropy_interval > 0 and now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self._ae_delay()
            self.nursery.start_soon(self.anti_entropy_once)
        interval = self.options.heartbeat_interval
        if self.joined and interval > 0 and now >= self._next_heartbeat:
            self._next_heartbeat = now + interval
            self.doc.heartbeat()
        if self.store is not None and self.store.should_compact(
            self.replica.log_bytes + 112 * self.replica.log_count
        ):
            size = self.store.compact(self.replica.envelopes())
            log.info("run %s: compacted its log to %d bytes", self.run_id, size)

    def _trim_mesh(self) -> None:
        """Above ``mesh_high`` links, close some we dialed (never a bootstrap peer's)."""
        surplus = len(self.linked_peers()) - self.options.mesh_high
        if surplus <= 0:
            return
        now = time.monotonic()
        ours = [
            link
            for peer in self.linked_peers()
            if peer not in self.bootstrap_peers
            and (link := self.link_for(peer)) is not None
            and link.initiator
            and now - link.opened > 5.0
        ]
        for link in random.sample(ours, min(surplus, len(ours))):
            link.close()

    def _close_duplicate_links(self) -> None:
        """Two peers that dialed each other at once keep the link the smaller id dialed."""
        me = self.node.peer_id
        for peer, links in list(self.links.items()):
            live = [lk for lk in links if not lk.closed]
            if len(live) < 2:
                continue
            keep_initiated = me < peer
            keep = next((lk for lk in live if lk.initiator == keep_initiated), live[0])
            for link in live:
                if link is not keep and time.monotonic() - link.opened > 1.0:
                    link.close()

    async def _dial_member(self, peer_id: str) -> None:
        try:
            self._learn_addrs(peer_id)
            await self.link_to(peer_id)
        except GossamerError as exc:
            log.debug("run %s: cannot link to %s: %s", self.run_id, peer_id[-8:], exc)
            # A refusal is not going to change soon; an unreachable peer might.
            penalty = 60.0 if isinstance(exc, RunAccessError) else 0.0
            self._dial_failed[peer_id] = time.monotonic() + penalty
        finally:
            self._dialing.discard(peer_id)

    def on_peer_connected(self, peer_id: str) -> None:
        """The node connected to ``peer_id``: exchange state if it is one of our members."""
        if peer_id in self.links or peer_id in self._dialing or not self.service.may_talk(peer_id):
            return
        if peer_id not in self.bootstrap_peers and self.doc.member(peer_id) is None:
            return
        if len(self.linked_peers()) >= self.options.mesh_high:
            return
        self._dialing.add(peer_id)
        self.nursery.start_soon(self._dial_member, peer_id)

    # ------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[RunDocument], bool], timeout: float) -> None:
        """Wait until ``predicate(doc)`` holds; trio.TooSlowError after ``timeout`` s."""
        with trio.fail_after(timeout):
            while not predicate(self.doc):
                await self._wait_change()

    def _notify_change(self) -> None:
        waiters, self._change_waiters = self._change_waiters, set()
        for event in waiters:
            event.set()

    async def _wait_change(self) -> None:
        event = trio.Event()
        self._change_waiters.add(event)
        await event.wait()

    async def caught_up(self, timeout: float) -> bool:
        """Wait until we hold at least as much of our own history as any linked peer had."""
        me = self.replica.client_id
        with trio.move_on_after(timeout):
            while True:
                wanted = max(
                    (lk.hello_sv.get(me, 0) for ls in self.links.values() for lk in ls), default=0
                )
                if self.replica.clock_of(me) >= wanted:
                    return True
                await self._wait_change()
        return False

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        out = self.doc.snapshot()
        out["sync"] = {
            "links": sorted(self.linked_peers()),
            "authors": len(self.replica.state_vector()),
            "updates_stored": self.replica.log_count,
            "bytes_stored": self.replica.log_bytes,
            "pending": self.replica.pending_count(),
            "anti_entropy_rounds": self.anti_entropy_rounds,
            **self.stats,
        }
        return out


# ------------------------------------------------------------------- service

_SERVICES: weakref.WeakKeyDictionary[Any, CrdtService] = weakref.WeakKeyDictionary()


class CrdtService:
    """The run documents of one node, and the ``/gossamer/crdt/1.0.0`` protocol."""

    def __init__(self, node: Node, options: SyncOptions | None = None) -> None:
        self.node = node
        self.options = options or SyncOptions()
        self.runs: dict[str, Run] = {}
        self._scores: dict[str, float] = {}
        self._banned_until: dict[str, float] = {}
        self.peer_filter: Callable[[str], bool] | None = None
        self.root = Path(node.config.data_dir) / "crdt"

    # ------------------------------------------------------------ startup

    @classmethod
    async def start(
        cls, node: Node, options: SyncOptions | None = None, *, resume: bool = True
    ) -> CrdtService:
        """The node's service (created, registered and, with ``resume``, stored runs reopened)."""
        existing = _SERVICES.get(node)
        if existing is not None:
            return existing
        service = cls(node, options)
        _SERVICES[node] = service
        node.set_stream_handler(PROTOCOL, service._handle_stream)
        node.add_connection_listener(service._on_connection)
        service._register_control()
        node.on_close(service.aclose)
        if resume and service.root.exists():
            for directory in sorted(service.root.iterdir()):
                try:
                    check_run_id(directory.name)
                except CharterError:
                    continue
                try:
                    await service.open_run(directory.name)
                except GossamerError as exc:
                    log.warning("cannot reopen run %s: %s", directory.name, exc)
        return service

    @classmethod
    def of(cls, node: Node) -> CrdtService | None:
        return _SERVICES.get(node)

    async def aclose(self) -> None:
        for run in list(self.runs.values()):
            run.close()
        self.runs.clear()

    # --------------------------------------------------------------- runs

    async def _start_run(self, charter: Charter, bootstrap: list[str]) -> Run:
        run = Run(self, charter, RunStore(self.root / charter.run_id), bootstrap)
        await self.node.nursery.start(run._main)
        self.runs[run.run_id] = run
        return run

    async def host_run(
        self,
        name: str,
        *,
        access: str | None = None,
        allow: list[str] | tuple[str, ...] | None = None,
        hosts: list[str] | tuple[str, ...] | None = None,
        config: dict[str, Any] | None = None,
        join: bool = True,
    ) -> Run:
        """Create (or reopen) our run ``name``; set its config and join it as a host.

        ``access`` ("open" or "restricted"), ``allow`` and ``hosts`` default to
        open / nobody / just us for a new run, and to what the stored charter
        says for a run we host already; giving them amends the charter.
        """
        identity = self.node.identity
        run_id = Charter.create(identity, name, created=0.0).run_id  # validates the name
        run = self.runs.get(run_id)
        if run is None:
            stored = RunStore(self.root / run_id).load_charter(run_id)
            if stored is None:
                stored = Charter.create(
                    identity,
                    name,
                    hosts=list(hosts or ()),
                    access=access or "open",
                    allow=list(allow or ()),
                )
            run = await self._start_run(stored, [])
        current = run.charter
        wanted_hosts = current.hosts if hosts is None else (identity.peer_id, *hosts)
        wanted_allow = current.allow if allow is None else frozenset(allow)
        wanted_access = current.access if access is None else access
        if (
            wanted_access != current.access
            or wanted_allow != current.allow
            or set(wanted_hosts) != set(current.hosts)
        ):
            run.update_charter(
                current.amend(
                    identity, hosts=list(wanted_hosts), access=wanted_access, allow=wanted_allow
                )
            )
        if config:
            run.doc.set_config(**config)
        if join:
            self._join_as_member(run, role="host")
        await _dht_announce(self.node, run.run_id)
        return run

    async def join_run(
        self,
        run_id: str,
        *,
        bootstrap: list[str] | tuple[str, ...] = (),
        role: str = "worker",
        timeout: float = 10.0,
        join: bool = True,
    ) -> Run:
        """Join run ``run_id`` through ``bootstrap`` multiaddrs (or the DHT); sync, then join.

        Raises RunAccessError when no peer lets us in, PeerUnreachable when no
        peer can be reached.
        """
        check_run_id(run_id)
        run = self.runs.get(run_id)
        with trio.fail_after(timeout):
            peers = []
            for addr in bootstrap:
                try:
                    peers.append(await self.node.connect(addr))
                except GossamerError as exc:
                    log.info("run %s: bootstrap %s: %s", run_id, addr, exc)
            if not peers:
                peers = await _dht_find_peers(self.node, run_id)
            if run is None:
                charter = RunStore(self.root / run_id).load_charter(run_id)
                if charter is None:
                    charter = await self._fetch_charter(run_id, peers)
                run = await self._start_run(charter, peers)
            else:
                run.bootstrap_peers.update(peers)
            errors = []
            for peer in peers:
                try:
                    await run.link_to(peer)
                except GossamerError as exc:
                    errors.append(exc)
            if peers and not run.linked_peers():
                first = errors[0] if errors else None
                if isinstance(first, RunAccessError):
                    raise first
                raise PeerUnreachable(f"no peer of run {run_id} answered: {first}")
        if join:
            await run.caught_up(timeout)
            self._join_as_member(run, role=role)
        await _dht_announce(self.node, run.run_id)
        return run

    async def open_run(self, run_id: str) -> Run:
        """Reopen a run from disk (restart): reload, then catch up with its members."""
        run = self.runs.get(run_id)
        if run is not None:
            return run
        charter = RunStore(self.root / run_id).load_charter(run_id)
        if charter is None:
            raise GossamerError(f"no stored charter for run {run_id}")
        run = await self._start_run(charter, [])
        me = self.node.peer_id
        member = run.doc.member(me)
        if member is not None:
            run.joined = True
            run.role = member.role
        return run

    def _join_as_member(self, run: Run, role: str) -> None:
        run.role = role
        run.joined = True
        run.doc.join(self.node.addrs(), role=role)

    async def _fetch_charter(self, run_id: str, peers: list[str]) -> Charter:
        if not peers:
            raise PeerUnreachable(f"no peer to ask about run {run_id} (give --bootstrap)")
        last: Exception | None = None
        for peer in peers:
            try:
                stream = await self.node.open_stream(peer, PROTOCOL)
            except GossamerError as exc:
                last = exc
                continue
            try:
                with trio.fail_after(self.options.hello_timeout):
                    await stream.write(hello_message(run_id, None, None))
                    payload = await wire.FrameReader(stream).read_frame(MAX_HELLO_BYTES, "hello")
                if payload is None:
                    raise PeerUnreachable(f"{peer[-8:]} closed the stream")
                msg = wire.unpack(payload)
                if isinstance(msg, list) and msg and msg[0] == ERROR:
                    raise RunAccessError(f"{peer[-8:]} refused run {run_id}: {msg[1:3]}")
                _, blob, _ = parse_hello(payload)
                if blob is None:
                    raise ProtocolError("the hello carries no charter")
                return Charter.decode(blob, run_id)
            except (
                trio.TooSlowError,
                ConnectionError,
                EOFError,
                GossamerError,
                CharterError,
            ) as exc:
                last = exc
            finally:
                await stream.close()
        if isinstance(last, RunAccessError):
            raise last
        raise PeerUnreachable(f"could not get the charter of run {run_id}: {last}")

    # ---------------------------------------------------------- inbound

    async def _handle_stream(self, stream: Stream) -> None:
        peer = stream.peer_id
        if not self.may_talk(peer):
            await stream.reset()
            return
        reader = wire.FrameReader(stream)
        try:
            with trio.fail_after(self.options.hello_timeout):
                payload = await reader.read_frame(MAX_HELLO_BYTES, "crdt hello")
        except (trio.TooSlowError, ConnectionError, EOFError, FrameTooLarge) as exc:
            log.info("crdt: no hello from %s: %r", peer[-8:], exc)
            await stream.reset()
            return
        if payload is None:
            await stream.close()
            return
        try:
            run_id, charter_blob, sv = parse_hello(payload)
        except ProtocolError as exc:
            self.penalise(peer, PENALTY_FORBIDDEN, f"bad hello: {exc}")
            await self._refuse(stream, "protocol", str(exc))
            return
        run = self.runs.get(run_id)
        if run is None:
            await self._refuse(stream, "unknown_run", f"this node does not replicate {run_id}")
            return
        if charter_blob is not None:
            run.consider_charter(charter_blob, peer)
        if not run.charter.may_join(peer):
            log.info("run %s: refused %s (not admitted)", run_id, peer[-8:])
            await self._refuse(stream, "not_admitted", f"you are not admitted to {run_id}")
            return
        try:
            with trio.fail_after(self.options.hello_timeout):
                await stream.write(hello_message(run_id, run.charter, run.replica.state_vector()))
                if sv is None:  # a charter probe: done
                    await reader.read_frame(0, "end of probe")
        except (trio.TooSlowError, ConnectionError, EOFError, FrameTooLarge):
            await stream.reset()
            return
        if sv is None:
            await stream.close()
            return
        link = Link(run, stream, reader, initiator=False)
        await run._serve_link(link, sv)

    async def _refuse(self, stream: Stream, code: str, text: str) -> None:
        try:
            with trio.move_on_after(self.options.hello_timeout):
                await stream.write(error_message(code, text))
        except ConnectionError:
            pass
        await stream.close()

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if not connected:
            return
        for run in list(self.runs.values()):
            try:
                run.on_peer_connected(peer_id)
            except Exception:
                log.exception("run %s: connection handler failed", run.run_id)

    # -------------------------------------------------------- penalties

    def may_talk(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        if until is not None:
            if time.monotonic() < until:
                return False
            del self._banned_until[peer_id]
            self._scores.pop(peer_id, None)
        return self.peer_filter is None or self.peer_filter(peer_id)

    def is_banned(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        return until is not None and time.monotonic() < until

    def penalise(self, peer_id: str, points: float, reason: str) -> None:
        score = self._scores.get(peer_id, 0.0) + points
        self._scores[peer_id] = score
        log.warning("crdt: penalising %s (+%g → %g): %s", peer_id[-8:], points, score, reason)
        if score >= BAN_SCORE and not self.is_banned(peer_id):
            self._banned_until[peer_id] = time.monotonic() + self.options.ban_seconds
            log.warning("crdt: banning %s for %.0f s", peer_id[-8:], self.options.ban_seconds)
            for run in self.runs.values():
                for link in run.links.get(peer_id, []):
                    link.close()

    def set_peer_filter(self, peer_filter: Callable[[str], bool] | None) -> None:
        """Talk only to peers for which ``peer_filter(peer_id)`` is true (None: everyone).

        For operator block lists, tests and benchmarks (a partition); links to
        peers that no longer pass are closed.
        """
        self.peer_filter = peer_filter
        if peer_filter is None:
            return
        for run in self.runs.values():
            for peer, links in list(run.links.items()):
                if not peer_filter(peer):
                    for link in links:
                        link.close()

    # ---------------------------------------------------------- control

    def _register_control(self) -> None:
        async def status(params: dict[str, Any]) -> Any:
            run = self._run_from_params(params)
            return run.status()

        async def runs(params: dict[str, Any]) -> Any:
            return [
                {
                    "run_id": run.run_id,
                    "members": len(run.doc.members()),
                    "round": run.doc.round().step,
                    "links": len(run.linked_peers()),
                }
                for run in self.runs.values()
            ]

        for name, handler in (("run.status", status), ("run.list", runs)):
            if name not in self.node.control_methods:
                self.node.register_control(name, handler)

    def _run_from_params(self, params: dict[str, Any]) -> Run:
        run_id = params.get("run")
        if not isinstance(run_id, str):
            raise GossamerError("run.status needs 'run', a run id")
        run = self.runs.get(run_id)
        if run is None:
            matches = [r for r in self.runs if r.startswith(run_id)]
            if len(matches) == 1:
                return self.runs[matches[0]]
            known = ", ".join(sorted(self.runs)) or "none"
            raise GossamerError(f"this node does not replicate run {run_id} (it has: {known})")
        return run


async def attach(node: Node) -> None:
    """Daemon extension (``gossamer.crdt.sync:attach``): serve and reopen stored runs."""
    await CrdtService.start(node)


# ------------------------------------------------------------------------ DHT
# A narrow use of node.dht when one is attached: announce and find a run's
# members.  Everything works without it, given bootstrap addresses.


def run_content_id(run_id: str) -> str:
    return hashlib.sha256(b"gossamer/run/" + run_id.encode()).hexdigest()


async def _dht_announce(node: Node, run_id: str) -> None:
    dht = getattr(node, "dht", None)
    if dht is None:
        return
    try:
        with trio.move_on_after(5.0):
            await dht.provide(run_content_id(run_id))
    except Exception as exc:  # the DHT is an optimisation here, never a requirement
        log.info("run %s: DHT announce failed: %s", run_id, exc)


async def _dht_find_peers(node: Node, run_id: str) -> list[str]:
    dht = getattr(node, "dht", None)
    if dht is None:
        return []
    try:
        with trio.move_on_after(5.0):
            providers = await dht.find_providers(run_content_id(run_id))
            out = []
            for provider in providers:
                peer = getattr(provider, "peer_id", provider)
                if isinstance(peer, str) and peer != node.peer_id:
                    out.append(peer)
            return out
    except Exception as exc:
        log.info("run %s: DHT lookup failed: %s", run_id, exc)
    return []
