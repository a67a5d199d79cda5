"""A run this node replicates: its replica and store, its links, and the waits on it.

The :class:`Run` ties the pieces of one run together: the checked replica and
its typed document, the on-disk log it reloads at start and appends to, the
links (:mod:`.link`, opened by :mod:`.handshake`), the mesh that floods and
heals (:mod:`.mesh`), charter changes, and the periodic upkeep (mesh,
heartbeats, log compaction).  The service that owns it is :mod:`.sync`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from gossamer.crdt import handshake
from gossamer.crdt.charter import Charter, CharterError
from gossamer.crdt.document import RunDocument
from gossamer.crdt.link import Link
from gossamer.crdt.mesh import Mesh
from gossamer.crdt.protocol import CHARTER, PENALTY_MALFORMED
from gossamer.crdt.replica import Receipt, Replica, Verdict
from gossamer.crdt.store import RunStore
from gossamer.node import GossamerError, wire

if TYPE_CHECKING:
    from gossamer.crdt.sync import CrdtService

log = logging.getLogger(__name__)


class Run:
    """A run this node replicates: the document plus its links and background work."""

    def __init__(
        self,
        service: CrdtService,
        charter: Charter,
        store: RunStore | None,
        bootstrap: list[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        # Two clocks, one owner: ``clock`` (unix time) is what goes into the document and
        # is compared across nodes (heartbeats, round times); ``monotonic`` times what
        # is local (link ages, dial back-off, pulls, heartbeat and anti-entropy
        # schedules).  The doc, the mesh and the links all read these.  Tests inject
        # fake ones; trio's sleeps and deadlines stay on trio's clock.
        self.clock = clock
        self.monotonic = monotonic
        self.node = service.node
        self.options = service.options
        self.replica = Replica(charter, self.node.identity, self.options.limits)
        self.doc = RunDocument(self.replica, clock)
        self.store = store
        self.links: dict[str, list[Link]] = {}
        self.bootstrap_peers: set[str] = set(bootstrap or ())
        self.invite: bytes | None = None  # the invite token our hellos show (join_run)
        self.joined = False
        self.role = "worker"
        self._cancel = trio.CancelScope()
        self._change_waiters: set[trio.Event] = set()
        self._dial_events: dict[str, trio.Event] = {}
        self.mesh = Mesh(self)
        self._next_heartbeat = 0.0
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
            return await handshake.dial(self, peer_id)
        finally:
            # Several waiters of a failed dial may each have started their own: remove only
            # ours (a KeyError here used to take the whole run down with it).
            if self._dial_events.get(peer_id) is event:
                del self._dial_events[peer_id]
            event.set()

    # --------------------------------------------------------- the mesh

    def candidates(self) -> list[str]:
        """Peers we could sync with (see :meth:`Mesh.candidates`)."""
        return self.mesh.candidates()

    async def anti_entropy_once(
        self, peer_id: str | None = None, timeout: float = 10.0
    ) -> str | None:
        """One push-pull exchange with ``peer_id`` (default: a random member); returns the peer."""
        return await self.mesh.anti_entropy_once(peer_id, timeout)

    def on_peer_connected(self, peer_id: str) -> None:
        """The node connected to ``peer_id``: exchange state if it is one of our members."""
        self.mesh.on_peer_connected(peer_id)

    def _on_receipt(self, receipt: Receipt, source: Any) -> None:
        """Replica listener: flood what is new to the mesh; penalise refusals found later."""
        if receipt.verdict is Verdict.REFUSED:
            if isinstance(source, Link):
                source.punish(receipt)
            return
        if receipt.verdict not in (Verdict.APPLIED, Verdict.STORED):
            return
        envelope = receipt.envelope
        assert envelope is not None
        if receipt.verdict is Verdict.APPLIED:
            self.stats["applied"] += 1
        exclude = source.peer_id if isinstance(source, Link) else None
        self.mesh.flood(envelope, receipt.verdict, exclude)
        self.notify_change()
        if source is None and receipt.verdict is Verdict.APPLIED:
            self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        if self.replica.own_log_length() >= self.options.checkpoint_every:
            envelope = self.replica.make_checkpoint()
            if envelope is not None:
                log.debug("run %s: checkpoint of our %d clocks", self.run_id, envelope.span[1])

    # ---------------------------------------------------------- charter

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
        self.notify_change()
        return True

    def update_charter(self, charter: Charter) -> None:
        """Adopt a charter we signed (see Charter.amend) and tell the mesh."""
        if not self.replica.set_charter(charter):
            raise GossamerError("the charter must be for this run and of a higher version")
        if self.store is not None:
            self.store.save_charter(charter)
        self._broadcast_charter()
        self._enforce_access()
        self.notify_change()

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

    # --------------------------------------------------------- maintenance

    async def _maintain(self) -> None:
        while True:
            try:
                self._maintain_once()
            except Exception:
                log.exception("run %s: maintenance failed", self.run_id)
            await trio.sleep(self.options.maintain_interval * random.uniform(0.8, 1.2))

    def _maintain_once(self) -> None:
        now = self.monotonic()
        if not self.charter.may_join(self.node.peer_id):
            return  # removed from the run: nothing to sync, nobody to dial
        self.mesh.maintain(now)
        interval = self.options.heartbeat_interval
        if self.joined and interval > 0 and now >= self._next_heartbeat:
            self._next_heartbeat = now + interval
            self.doc.heartbeat()
        if self.store is not None and self.store.should_compact(
            self.replica.log_bytes + 112 * self.replica.log_count
        ):
            size = self.store.compact(self.replica.envelopes())
            log.info("run %s: compacted its log to %d bytes", self.run_id, size)

    # ------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[RunDocument], bool], timeout: float) -> None:
        """Wait until ``predicate(doc)`` holds; trio.TooSlowError after ``timeout`` s."""
        with trio.fail_after(timeout):
            while not predicate(self.doc):
                await self._wait_change()

    def notify_change(self) -> None:
        """Wake whoever waits on this run (the document, its links or its charter changed)."""
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
            "anti_entropy_rounds": self.mesh.anti_entropy_rounds,
            **self.stats,
        }
        return out
