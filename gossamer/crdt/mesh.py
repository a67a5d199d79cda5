"""The mesh of one run: which members we link to, how updates flood it, how it heals.

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
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

import trio

from gossamer.crdt.envelope import Envelope
from gossamer.crdt.protocol import SV_REQUEST, RunAccessError
from gossamer.crdt.replica import Verdict
from gossamer.node import wire
from gossamer.node.errors import GossamerError

if TYPE_CHECKING:
    from gossamer.crdt.link import Link
    from gossamer.crdt.run import Run

log = logging.getLogger("gossamer.crdt.sync")


class Mesh:
    """The links a run keeps, the flooding over them, and its anti-entropy rounds."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.options = run.options
        self._dialing: set[str] = set()
        self._dial_failed: dict[str, float] = {}
        self._pulls: dict[tuple[int, int], float] = {}
        self._next_anti_entropy = time.monotonic() + self._ae_delay()
        self.anti_entropy_rounds = 0

    def _ae_delay(self) -> float:
        return self.options.anti_entropy_interval * random.uniform(0.8, 1.2)

    # ------------------------------------------------------------ flooding

    def flood(self, envelope: Envelope, verdict: Verdict, exclude: str | None) -> None:
        """Forward an envelope new to us to every linked peer but ``exclude``."""
        run = self.run
        for peer, links in list(run.links.items()):
            if peer == exclude:
                continue
            link = next((lk for lk in links if not lk.closed), None)
            if link is None:
                continue
            if verdict is Verdict.STORED:
                # a checkpoint: the peer holds the clocks but may compact its log too
                link.send_envelope(envelope, skippable=False)
                run.stats["sent"] += 1
            elif link.offer(envelope, lazy=True):
                run.stats["sent"] += 1

    def maybe_pull(self, link: Link, client: int, end: int) -> None:
        """A peer announced clocks we lack: ask it, unless we asked someone recently."""
        replica = self.run.replica
        if replica.clock_of(client) >= end:
            return
        now = time.monotonic()
        asked = self._pulls.get((client, end))
        if asked is not None and now - asked < self.options.pull_timeout:
            return
        if len(self._pulls) > 10_000:
            self._pulls.clear()
        self._pulls[(client, end)] = now
        link.send_raw(wire.frame(wire.pack([SV_REQUEST, 0, replica.state_vector()])))

    # -------------------------------------------------------- anti-entropy

    def candidates(self) -> list[str]:
        """Peers we could sync with: live members, bootstrap peers and linked peers.

        A member whose last heartbeat is older than ``stale_member_s`` is
        skipped (it probably left without saying so); one that never sent a
        heartbeat is kept.
        """
        run = self.run
        me = run.node.peer_id
        now = time.time()
        stale = self.options.stale_member_s
        members = {
            p
            for p, m in run.doc.members().items()
            if m.heartbeat is None or now - m.heartbeat < stale
        }
        peers = members | run.bootstrap_peers | set(run.linked_peers())
        return sorted(
            p for p in peers if p != me and run.service.may_talk(p) and run.charter.may_join(p)
        )

    async def anti_entropy_once(
        self, peer_id: str | None = None, timeout: float = 10.0
    ) -> str | None:
        """One push-pull exchange with ``peer_id`` (default: a random member); returns the peer."""
        run = self.run
        if peer_id is None:
            choices = self.candidates()
            if not choices:
                return None
            peer_id = random.choice(choices)
        self.anti_entropy_rounds += 1
        with trio.move_on_after(timeout):
            self._learn_addrs(peer_id)
            try:
                link = await run.link_to(peer_id)
            except GossamerError as exc:
                log.debug("anti-entropy with %s: %s", peer_id[-8:], exc)
                self._dial_failed[peer_id] = time.monotonic()
                return None
            nonce = random.getrandbits(62) + 1
            event = trio.Event()
            link.waiters[nonce] = event
            link.send_raw(wire.frame(wire.pack([SV_REQUEST, nonce, run.replica.state_vector()])))
            await event.wait()
        return peer_id

    def _learn_addrs(self, peer_id: str) -> None:
        member = self.run.doc.member(peer_id)
        if member is not None and member.addrs:
            self.run.node.peers.add_addrs(peer_id, list(member.addrs))

    # --------------------------------------------------------- maintenance

    def maintain(self, now: float) -> None:
        """Close duplicate and surplus links, dial up to ``mesh_low``, start anti-entropy."""
        run = self.run
        self._close_duplicate_links()
        self._trim_mesh()
        linked = set(run.linked_peers())
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
                run.nursery.start_soon(self._dial_member, peer)
        if self.options.anti_entropy_interval > 0 and now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self._ae_delay()
            run.nursery.start_soon(self.anti_entropy_once)

    def _trim_mesh(self) -> None:
        """Above ``mesh_high`` links, close some we dialed (never a bootstrap peer's)."""
        run = self.run
        surplus = len(run.linked_peers()) - self.options.mesh_high
        if surplus <= 0:
            return
        now = time.monotonic()
        ours = [
            link
            for peer in run.linked_peers()
            if peer not in run.bootstrap_peers
            and (link := run.link_for(peer)) is not None
            and link.initiator
            and now - link.opened > 5.0
        ]
        for link in random.sample(ours, min(surplus, len(ours))):
            link.close()

    def _close_duplicate_links(self) -> None:
        """Two peers that dialed each other at once keep the link the smaller id dialed."""
        me = self.run.node.peer_id
        for peer, links in list(self.run.links.items()):
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
            await self.run.link_to(peer_id)
        except GossamerError as exc:
            log.debug("run %s: cannot link to %s: %s", self.run.run_id, peer_id[-8:], exc)
            # A refusal is not going to change soon; an unreachable peer might.
            penalty = 60.0 if isinstance(exc, RunAccessError) else 0.0
            self._dial_failed[peer_id] = time.monotonic() + penalty
        finally:
            self._dialing.discard(peer_id)

    def on_peer_connected(self, peer_id: str) -> None:
        """The node connected to ``peer_id``: exchange state if it is one of our members."""
        run = self.run
        if peer_id in run.links or peer_id in self._dialing or not run.service.may_talk(peer_id):
            return
        if peer_id not in run.bootstrap_peers and run.doc.member(peer_id) is None:
            return
        if len(run.linked_peers()) >= self.options.mesh_high:
            return
        self._dialing.add(peer_id)
        run.nursery.start_soon(self._dial_member, peer_id)
