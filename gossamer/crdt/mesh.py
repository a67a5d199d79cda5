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

**Policy and I/O.**  What to close, whom to dial and when to run anti-entropy
is :class:`MeshPolicy`, a pure function of a snapshot (links by peer, the
candidates, past dial failures) and ``now``; :class:`Mesh` reads the run's
clocks and state, asks the policy and applies its answer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from gossamer.crdt.envelope import Envelope
from gossamer.crdt.protocol import SV_REQUEST, RunAccessError
from gossamer.crdt.replica import Verdict
from gossamer.node import GossamerError, wire

if TYPE_CHECKING:
    from gossamer.crdt.link import Link
    from gossamer.crdt.options import SyncOptions
    from gossamer.crdt.run import Run

log = logging.getLogger(__name__)

T = TypeVar("T")


class LinkState(Protocol):
    """What the policy reads of a link (:class:`~gossamer.crdt.link.Link` has it)."""

    @property
    def initiator(self) -> bool: ...  # we dialed it

    @property
    def opened(self) -> float: ...  # monotonic seconds

    @property
    def closed(self) -> bool: ...


L = TypeVar("L", bound=LinkState)


class Chance(Protocol):
    """The random choices the policy makes: the :mod:`random` module itself (what the
    mesh passes, so ``random.seed`` in a benchmark still fixes them) or a seeded
    :class:`random.Random` (what a test passes)."""

    def sample(self, population: Sequence[T], k: int) -> list[T]: ...

    def shuffle(self, x: list[Any]) -> None: ...

    def uniform(self, a: float, b: float) -> float: ...


class MeshPolicy:
    """Which links the mesh closes and which peers it dials, from a snapshot and ``now``.

    No clock, no network and no state of its own: :class:`Mesh` passes what it
    sees (the run's links by peer, in the order they were opened; the peers it
    could dial; when dials failed) with the time (monotonic seconds, except
    :meth:`is_live`, which compares wall-clock heartbeats) and applies the answer.
    Nothing passed in is changed.
    """

    DUPLICATE_GRACE_S = 1.0  # let a simultaneous dial finish its hello before closing one
    TRIM_MIN_AGE_S = 5.0  # a link this young may still be bringing a peer up to date
    REFUSED_DIAL_PENALTY_S = 60.0  # a refusal is not going to change soon

    def __init__(self, options: SyncOptions) -> None:
        self.options = options

    # ------------------------------------------------------------- closing

    def links_to_close(
        self,
        me: str,
        links: Mapping[str, Sequence[L]],
        bootstrap: Set[str],
        now: float,
        rng: Chance,
    ) -> list[L]:
        """Duplicate links first, then the surplus above ``mesh_high``.

        Two peers that dialed each other at once keep the link the smaller id
        dialed.  Above ``mesh_high`` linked peers, some links we dialed are
        closed, never a bootstrap peer's and never one younger than
        :attr:`TRIM_MIN_AGE_S`.
        """
        closing = self._duplicates(me, links, now)
        closing_ids = {id(link) for link in closing}

        def first_open(peer: str) -> L | None:
            return next(
                (lk for lk in links[peer] if not lk.closed and id(lk) not in closing_ids), None
            )

        linked = [peer for peer in links if first_open(peer) is not None]
        surplus = len(linked) - self.options.mesh_high
        if surplus > 0:
            ours = [
                link
                for peer in linked
                if peer not in bootstrap
                and (link := first_open(peer)) is not None
                and link.initiator
                and now - link.opened > self.TRIM_MIN_AGE_S
            ]
            closing += rng.sample(ours, min(surplus, len(ours)))
        return closing

    def _duplicates(self, me: str, links: Mapping[str, Sequence[L]], now: float) -> list[L]:
        closing: list[L] = []
        for peer, peer_links in links.items():
            live = [lk for lk in peer_links if not lk.closed]
            if len(live) < 2:
                continue
            keep_initiated = me < peer
            keep = next((lk for lk in live if lk.initiator == keep_initiated), live[0])
            closing += [
                lk for lk in live if lk is not keep and now - lk.opened > self.DUPLICATE_GRACE_S
            ]
        return closing

    # ------------------------------------------------------------- dialing

    def dials_wanted(self, linked: int, dialing: int) -> int:
        """How many new dials bring linked plus dialing peers up to ``mesh_low`` (<= 0: none)."""
        return self.options.mesh_low - linked - dialing

    def peers_to_dial(
        self,
        candidates: Sequence[str],
        linked: Set[str],
        dialing: Set[str],
        dial_failed: Mapping[str, float],
        now: float,
        want: int,
        rng: Chance,
    ) -> list[str]:
        """Up to ``want`` candidates, at random, that are neither linked nor being dialed
        and whose last failed dial (``dial_failed``: when, plus any penalty) is at least
        ``dial_backoff`` old."""
        if want <= 0:
            return []
        fresh = [
            p
            for p in candidates
            if p not in linked
            and p not in dialing
            and now - dial_failed.get(p, -1e9) >= self.options.dial_backoff
        ]
        rng.shuffle(fresh)
        return fresh[:want]

    def dial_penalty(self, refused: bool) -> float:
        """Seconds added to a failed dial's time: a refusal waits longer than a failure."""
        return self.REFUSED_DIAL_PENALTY_S if refused else 0.0

    def has_room(self, linked: int) -> bool:
        """Whether a peer that connected to us is worth a link (we are below ``mesh_high``)."""
        return linked < self.options.mesh_high

    # -------------------------------------------------------- anti-entropy

    def anti_entropy_due(self, now: float, next_at: float) -> bool:
        return self.options.anti_entropy_interval > 0 and now >= next_at

    def next_anti_entropy(self, now: float, rng: Chance) -> float:
        """When the next round starts: ``anti_entropy_interval`` from ``now``, ±20 %."""
        return now + self.options.anti_entropy_interval * rng.uniform(0.8, 1.2)

    def is_live(self, heartbeat: float | None, wall_now: float) -> bool:
        """A member worth syncing with: it never sent a heartbeat, or one newer than
        ``stale_member_s`` (older: it probably left without saying so)."""
        return heartbeat is None or wall_now - heartbeat < self.options.stale_member_s

    def should_pull(self, have: int, end: int, asked_at: float | None, now: float) -> bool:
        """Ask for clocks up to ``end`` of an author we hold up to ``have``, unless someone
        was asked for them less than ``pull_timeout`` ago."""
        if have >= end:
            return False
        return asked_at is None or now - asked_at >= self.options.pull_timeout


class Mesh:
    """The links a run keeps, the flooding over them, and its anti-entropy rounds.

    The decisions are :class:`MeshPolicy`'s; this is the I/O around them: it
    reads the run's clocks and links, closes and dials, and sends.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.options = run.options
        self.policy = MeshPolicy(run.options)
        self._dialing: set[str] = set()
        self._dial_failed: dict[str, float] = {}  # monotonic: when, plus any penalty
        self._pulls: dict[tuple[int, int], float] = {}
        self._next_anti_entropy = self.policy.next_anti_entropy(run.monotonic(), random)
        self.anti_entropy_rounds = 0

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
        have = replica.clock_of(client)
        if have >= end:
            return
        now = self.run.monotonic()
        if not self.policy.should_pull(have, end, self._pulls.get((client, end)), now):
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
        now = run.clock()
        members = {p for p, m in run.doc.members().items() if self.policy.is_live(m.heartbeat, now)}
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
                self._dial_failed[peer_id] = run.monotonic()
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
        """Close duplicate and surplus links, dial up to ``mesh_low``, start anti-entropy.

        ``now`` is the run's monotonic clock.
        """
        run = self.run
        policy = self.policy
        for link in policy.links_to_close(
            run.node.peer_id, run.links, run.bootstrap_peers, now, random
        ):
            link.close()
        linked = set(run.linked_peers())
        want = policy.dials_wanted(len(linked), len(self._dialing))
        if want > 0:
            dials = policy.peers_to_dial(
                self.candidates(), linked, self._dialing, self._dial_failed, now, want, random
            )
            for peer in dials:
                self._dialing.add(peer)
                run.nursery.start_soon(self._dial_member, peer)
        if policy.anti_entropy_due(now, self._next_anti_entropy):
            self._next_anti_entropy = policy.next_anti_entropy(now, random)
            run.nursery.start_soon(self.anti_entropy_once)

    async def _dial_member(self, peer_id: str) -> None:
        try:
            self._learn_addrs(peer_id)
            await self.run.link_to(peer_id)
        except GossamerError as exc:
            log.debug("run %s: cannot link to %s: %s", self.run.run_id, peer_id[-8:], exc)
            # A refusal is not going to change soon; an unreachable peer might.
            penalty = self.policy.dial_penalty(refused=isinstance(exc, RunAccessError))
            self._dial_failed[peer_id] = self.run.monotonic() + penalty
        finally:
            self._dialing.discard(peer_id)

    def on_peer_connected(self, peer_id: str) -> None:
        """The node connected to ``peer_id``: exchange state if it is one of our members."""
        run = self.run
        if peer_id in run.links or peer_id in self._dialing or not run.service.may_talk(peer_id):
            return
        if peer_id not in run.bootstrap_peers and run.doc.member(peer_id) is None:
            return
        if not self.policy.has_room(len(run.linked_peers())):
            return
        self._dialing.add(peer_id)
        run.nursery.start_soon(self._dial_member, peer_id)
