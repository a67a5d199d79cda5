"""State sync: a member gets the run's state (parameters + outer optimizer state) from peers.

Who needs it: a newcomer entering a run mid-way, a member that restarted and whose checkpoint is
behind, and a member whose parity digest disagreed with the majority's. What it needs is ``S_r``
(see :mod:`gossamer.training.rounds`), named by its ``state_digest``, which the run document
already lists for the current round — so the wanted bits are known before a byte arrives.

Layout. A state is one flat fp32 vector, parameters (sorted by name) then the outer optimizer's
momentum buffers (same order), cut into chunks of ``CHUNK_ELEMS`` (4 MiB); the manifest lists the
parameter names and shapes, the outer optimizer's scalars and a sha256 per chunk. Every member
builds the same manifest for the same state, so chunks of one state can come from any holder.

Protocol (RPC service ``statesync`` plus the tensor data plane):

1. ``manifest(digest)`` → the manifest, or ``Refused`` if the peer does not hold that state
   (members keep the last ``KEEP`` states they entered a round with);
2. ``send(digest, chunks, tag)`` → ``{"ok": true}`` at once; the peer then sends each chunk ``i``
   through the data plane under ``<tag>/<i>`` to the caller, who posted zero-copy receives into
   the slices of its preallocated vector beforehand.

Fetching (:func:`fetch_state`): ask every holder (up to ``MAX_SOURCES``) for its manifest in
parallel; keep the holders whose manifest matches the majority's and our model's layout; deal the
chunks round-robin among them, so chunks come from several peers at once; check each chunk's
sha256 as it lands; a chunk that is late or wrong drops its source and goes to another; finally
rebuild the state and check its ``state_digest`` against the one the run document names. A bad
peer can waste time, never corrupt the state.

Serving (:class:`StateService`) is for the members of the run a state belongs to, and bounded
per peer, since a peer id costs nothing and one ``send`` names up to ``MAX_CHUNKS_PER_REQUEST``
chunks of 4 MiB each:

- who: a state is served to the peers its membership rule admits. ``publish(snapshot)`` without
  a rule serves the members of the runs this node replicates whose run document names the state
  in a round entry (the charter admits the peer and the peer wrote its member record); no such
  run, no one. A run found naming the state when a peer asks for it keeps it, so a holder that
  moved on to the next round still serves that state to the run's members (a state no one asked
  for before its run moved on is served to no one). ``publish(snapshot, allowed=rule)`` sets
  another rule (:func:`anyone` for tests and public states);
- how much: the chunk indices of a request are de-duplicated; one upload per peer at a time (a
  request waits ``BUSY_GRACE_S`` at most for the peer's previous one to end) and
  ``MAX_SENDING_PEERS`` in all (``busy``); the bytes a peer may make us send are a leaky bucket
  (:class:`ServeBudget`) of ``BUDGET_SNAPSHOTS`` times the state's size, draining over
  ``BUDGET_WINDOW_S`` (``rate_limited``). An honest fetch costs a source at most one copy.

Every refusal is a :class:`Refused` with a code (``unknown_state``, ``not_member``, ``bad_chunks``,
``bad_tag``, ``busy``, ``rate_limited``) and our own words, logged once per peer per minute.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from gossamer.crdt import CrdtService
from gossamer.node import (
    CallContext,
    DeadlineExceeded,
    DeadlinePolicy,
    GossamerError,
    LinkEstimates,
    Refused,
    Service,
)
from gossamer.node.rpc import rpc
from gossamer.training.outer import OuterState, state_digest

log = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 20  # 4 MiB of fp32 per chunk
KEEP = 3  # states a member keeps serving
MAX_SOURCES = 8
MAX_CHUNKS_PER_REQUEST = 4096
MANIFEST_TIMEOUT_S = 5.0
# A chunk's deadline is what the link to that peer did lately (the data plane's measurements
# of its own transfers, node/dataplane/links.py) under a DeadlinePolicy; a source that misses
# it for a chunk is dropped.  Unmeasured links get the policy's ceiling.
BUDGET_SNAPSHOTS = 2.0  # copies of a state one peer may pull at once, and per window after that
BUDGET_WINDOW_S = 60.0
MAX_SENDING_PEERS = 8  # peers we upload states to at the same time
BUSY_GRACE_S = 1.0  # a request may wait this long for the peer's previous upload to end

Layout = list[tuple[str, tuple[int, ...]]]
Allowed = Callable[[str], bool]  # a membership rule: may this peer have the state?


class StateSyncError(GossamerError):
    """The state could not be had from any peer (or did not verify)."""


@dataclass
class Snapshot:
    """One state as members serve it: a flat fp32 vector plus what it takes to rebuild it."""

    digest: str
    layout: Layout  # parameter names (sorted) and shapes
    outer: dict[str, Any]  # lr, momentum, nesterov, step
    flat: torch.Tensor  # params then momentum buffers, fp32, never modified once built
    _hashes: list[str] | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return int(self.flat.numel())

    @property
    def nbytes(self) -> int:
        return 4 * self.numel

    def spans(self) -> list[tuple[int, int]]:
        """Where each chunk lies in ``flat``."""
        return chunks(self.numel)

    def chunk_hashes(self) -> list[str]:
        if self._hashes is None:
            self._hashes = [_sha256(self.flat[a:b]) for a, b in chunks(self.numel)]
        return self._hashes

    def manifest(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "layout": [[name, list(shape)] for name, shape in self.layout],
            "outer": self.outer,
            "numel": self.numel,
            "chunk_elems": CHUNK_ELEMS,
            "chunks": self.chunk_hashes(),
        }


def chunks(numel: int, chunk_elems: int | None = None) -> list[tuple[int, int]]:
    size = chunk_elems or CHUNK_ELEMS
    return [(a, min(a + size, numel)) for a in range(0, numel, size)]


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.contiguous().view(torch.uint8).numpy())).hexdigest()


def layout_of(params: Mapping[str, torch.Tensor]) -> Layout:
    return [(name, tuple(int(d) for d in params[name].shape)) for name in sorted(params)]


def make_snapshot(
    params: Mapping[str, torch.Tensor], outer: OuterState, digest: str | None = None
) -> Snapshot:
    """Pack a state into one flat vector (a copy: the caller may keep changing its tensors)."""
    layout = layout_of(params)
    total = sum(math.prod(shape) for _, shape in layout)
    flat = torch.empty(2 * total, dtype=torch.float32)
    offset = 0
    for group in (params, outer.momentum_buffers):
        for name, _ in layout:
            t = group[name].detach().to("cpu", torch.float32).reshape(-1)
            flat[offset : offset + t.numel()] = t
            offset += t.numel()
    scalars = {
        "lr": outer.lr,
        "momentum": outer.momentum,
        "nesterov": outer.nesterov,
        "step": outer.step,
    }
    return Snapshot(digest or state_digest(params, outer), layout, scalars, flat)


def unpack_snapshot(
    flat: torch.Tensor, layout: Layout, outer: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], OuterState]:
    """The inverse of :func:`make_snapshot` (tensors are views of ``flat``, cloned)."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    offset = 0
    for group in (params, buffers):
        for name, shape in layout:
            n = math.prod(shape)
            group[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
    if offset != flat.numel():
        raise StateSyncError(f"layout covers {offset} values, the state has {flat.numel()}")
    state = OuterState(
        float(outer["lr"]),
        float(outer["momentum"]),
        bool(outer["nesterov"]),
        int(outer["step"]),
        buffers,
    )
    return params, state


def anyone(peer_id: str) -> bool:
    """The membership rule that admits every peer (tests, and states that are public)."""
    return True


def runs_naming(digest: str, docs: Mapping[str, Any]) -> set[str]:
    """The runs (id → :class:`gossamer.crdt.RunDocument`) whose round entries name ``digest``."""
    return {
        run_id
        for run_id, doc in docs.items()
        if any(entry.hash == digest for entry in doc.round_entries().values())
    }


def admitted(peer_id: str, doc: Any) -> bool:
    """Is ``peer_id`` a member of the run: its charter lets the peer in and the peer joined?"""
    return doc.charter.may_join(peer_id) and doc.member(peer_id) is not None


class ServeBudget:
    """The bytes each peer may make us send, as a leaky bucket per peer (no I/O, no clock).

    What a peer was granted drains at ``capacity / window`` bytes per second; a request is
    granted if its cost fits under ``capacity`` on top of what has not drained yet. So a peer
    gets at most ``capacity`` at once and ``capacity`` per ``window`` after that. ``capacity``
    comes with each call (it follows the size of the state asked for); ``now`` is a monotonic
    time. At most ``max_peers`` peers are remembered (those idle longest are forgotten first:
    forgetting a peer only forgets a debt that was draining anyway).
    """

    def __init__(self, window: float = BUDGET_WINDOW_S, max_peers: int = 4096) -> None:
        if window <= 0:
            raise ValueError("the budget window must be positive")
        self.window = window
        self.max_peers = max_peers
        self._spent: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (bytes, at)

    def spent(self, peer_id: str, capacity: float, now: float) -> float:
        """What ``peer_id`` was granted and has not drained yet."""
        amount, at = self._spent.get(peer_id, (0.0, now))
        return max(0.0, amount - max(0.0, now - at) * capacity / self.window)

    def grant(self, peer_id: str, cost: float, capacity: float, now: float) -> bool:
        """Grant ``cost`` bytes to ``peer_id`` if they fit; True if granted (and recorded)."""
        spent = self.spent(peer_id, capacity, now)
        if spent + cost > capacity:
            return False
        self._set(peer_id, spent + cost, now)
        return True

    def refund(self, peer_id: str, amount: float, capacity: float, now: float) -> None:
        """Give back ``amount`` granted bytes that were never sent."""
        if amount > 0 and peer_id in self._spent:
            self._set(peer_id, max(0.0, self.spent(peer_id, capacity, now) - amount), now)

    def _set(self, peer_id: str, amount: float, now: float) -> None:
        self._spent[peer_id] = (amount, now)
        self._spent.move_to_end(peer_id)
        while len(self._spent) > self.max_peers:
            self._spent.popitem(last=False)


@dataclass
class _Held:
    """A state we serve, with who may have it."""

    snapshot: Snapshot
    allowed: Allowed | None  # None: the members of the runs whose documents name it
    runs: set[str] = field(default_factory=set)  # runs found naming it (they keep it)


def _manifest_cost(snap: Snapshot) -> int:
    """About the bytes of a manifest on the wire (charged to the asker's budget)."""
    return 256 + 72 * len(snap.spans()) + sum(64 + 12 * len(s) for _, s in snap.layout)


class StateService(Service):
    """Serves the states this member holds (``publish`` them as rounds begin) to the members
    of their run, within a byte budget per peer (see the module's notes)."""

    name = "statesync"

    def __init__(
        self,
        node: Any,
        keep: int = KEEP,
        *,
        budget_snapshots: float = BUDGET_SNAPSHOTS,
        budget_window: float = BUDGET_WINDOW_S,
        max_sending_peers: int = MAX_SENDING_PEERS,
        clock: Callable[[], float] = time.monotonic,
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self.node = node
        # a chunk to a peer whose link nothing measured gets the ceiling: a downloader that
        # stops reading holds one upload that long at most
        self.deadlines = deadlines or DeadlinePolicy(ceiling=120.0)
        self.keep = keep
        self.budget_snapshots = budget_snapshots
        self.max_sending_peers = max_sending_peers
        self.budget = ServeBudget(budget_window)
        self.clock = clock
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._uploads: dict[str, trio.Event] = {}  # peer -> set when its upload ends
        self._waiting: set[str] = set()  # peers with a request waiting for that
        self.bytes_served = 0

    @classmethod
    def attach(cls, node: Any, **settings: Any) -> StateService:
        """The node's state service (registered on first use, with ``settings`` for
        :meth:`__init__`; settings for a service that exists already are an error)."""
        existing = node.service(StateService)
        if existing is not None:
            if settings:
                raise GossamerError("the node's state service exists already")
            return existing
        service = cls(node, **settings)
        node.register(service)
        node.attach(service)
        return service

    @property
    def sending(self) -> set[str]:
        """The peers we are uploading to now."""
        return set(self._uploads)

    @property
    def snapshots(self) -> dict[str, Snapshot]:
        """The states we serve, oldest first."""
        return {digest: held.snapshot for digest, held in self._held.items()}

    def publish(self, snapshot: Snapshot, *, allowed: Allowed | None = None) -> None:
        """Serve ``snapshot`` to the peers ``allowed`` admits; by default to the members of the
        runs (on this node) whose documents name it. Keeps the last ``keep`` states."""
        held = self._held.get(snapshot.digest)
        if held is None:
            held = self._held[snapshot.digest] = _Held(snapshot, allowed)
        else:
            held.snapshot = snapshot
            if allowed is not None:
                held.allowed = allowed
        self._held.move_to_end(snapshot.digest)
        while len(self._held) > self.keep:
            self._held.popitem(last=False)

    def allows(self, digest: str, peer_id: str) -> bool:
        """May ``peer_id`` have state ``digest`` (which we hold)?"""
        held = self._held.get(digest)
        if held is None:
            return False
        if held.allowed is not None:
            return bool(held.allowed(peer_id))
        crdt = self.node.service(CrdtService)
        if crdt is None:
            return False
        docs = {run_id: run.doc for run_id, run in crdt.runs.items()}
        if any(admitted(peer_id, docs[r]) for r in held.runs if r in docs):
            return True
        found = runs_naming(digest, {r: d for r, d in docs.items() if r not in held.runs})
        held.runs |= found
        return any(admitted(peer_id, docs[r]) for r in found)

    def _refuse(self, peer: str, message: str, code: str) -> Refused:
        self.node.complaints.log(
            log, peer, "state sync: refused %s (%s): %s", peer[-8:], code, message
        )
        return Refused(message, code)

    def _admit(self, peer: str, digest: str) -> Snapshot:
        held = self._held.get(digest) if isinstance(digest, str) else None
        if held is None:  # ordinary (a holder moved on): no complaint
            raise Refused(f"this member does not hold state {str(digest)[:12]}", "unknown_state")
        if not self.allows(digest, peer):
            raise self._refuse(peer, "state sync serves the members of the run only", "not_member")
        return held.snapshot

    def capacity(self, snap: Snapshot) -> float:
        """The bytes of ``snap`` one peer may pull at once (and per window): copies of the
        state with its manifest."""
        return self.budget_snapshots * (snap.nbytes + _manifest_cost(snap))

    def _grant(self, peer: str, snap: Snapshot, cost: int) -> None:
        if not self.budget.grant(peer, cost, self.capacity(snap), self.clock()):
            raise self._refuse(
                peer,
                f"over the state sync budget ({self.budget_snapshots:g} copies of the state "
                f"per {self.budget.window:g} s)",
                "rate_limited",
            )

    @rpc
    async def manifest(self, ctx: CallContext, digest: str) -> dict[str, Any]:
        snap = self._admit(ctx.peer_id, digest)
        self._grant(ctx.peer_id, snap, _manifest_cost(snap))
        return await trio.to_thread.run_sync(snap.manifest)

    @rpc
    async def send(self, ctx: CallContext, digest: str, chunks: list, tag: str) -> dict[str, Any]:
        peer = ctx.peer_id
        snap = self._admit(peer, digest)
        spans = snap.spans()
        count = len(spans)
        if not 0 < len(chunks) <= MAX_CHUNKS_PER_REQUEST or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chunks
        ):
            raise self._refuse(peer, f"chunks must be indices below {count}", "bad_chunks")
        if not isinstance(tag, str) or not tag.startswith("ss/") or len(tag) > 64:
            raise self._refuse(peer, "tag must start with 'ss/' (at most 64 characters)", "bad_tag")
        indices = list(dict.fromkeys(chunks))  # each chunk once, in the order asked
        await self._previous_upload(peer)
        if len(self._uploads) >= self.max_sending_peers:
            raise self._refuse(peer, "this member is uploading to enough peers", "busy")
        cost = sum(4 * (spans[i][1] - spans[i][0]) for i in indices)
        self._grant(peer, snap, cost)
        self._uploads[peer] = trio.Event()
        self.node.nursery.start_soon(self._send_chunks, peer, snap, indices, tag, cost)
        return {"ok": True}

    async def _previous_upload(self, peer: str) -> None:
        """Wait (``BUSY_GRACE_S`` at most) for the upload to ``peer`` under way to end, as
        when a fetcher asks again just before our last chunk's receipt is back; one request
        per peer waits, any other is refused, as is this one if the upload goes on."""
        done = self._uploads.get(peer)
        if done is None:
            return
        if peer in self._waiting:
            raise self._refuse(peer, "an upload to this peer is under way", "busy")
        self._waiting.add(peer)
        try:
            with trio.move_on_after(BUSY_GRACE_S):
                await done.wait()
        finally:
            self._waiting.discard(peer)
        if peer in self._uploads:
            raise self._refuse(peer, "an upload to this peer is under way", "busy")

    async def _send_chunks(
        self, peer: str, snap: Snapshot, indices: list[int], tag: str, granted: int
    ) -> None:
        """Upload ``indices`` to ``peer`` (our task, started for the peer: nothing it provokes
        leaves it); give back the budget of what was not sent."""
        spans = snap.spans()
        sent = 0
        try:
            for i in indices:
                a, b = spans[i]
                timeout = self.deadlines.deadline(
                    self.node.dataplane.links.seconds_for(peer, 4 * (b - a))
                )
                report = await self.node.dataplane.send(
                    peer, f"{tag}/{i}", {"x": snap.flat[a:b]}, timeout=timeout
                )
                sent += 4 * (b - a)
                self.bytes_served += report.nbytes
        except (GossamerError, trio.TooSlowError) as exc:
            self.node.complaints.log(
                log, peer, "state sync: sending to %s stopped: %s", peer[-8:], str(exc)[:200]
            )
        except Exception as exc:  # a peer's upload must never take the node down
            self.node.complaints.log(
                log, peer, "state sync: sending to %s failed: %s", peer[-8:], type(exc).__name__
            )
            log.debug("state sync: the upload's failure", exc_info=True)
        finally:
            self._uploads.pop(peer).set()
            self.budget.refund(peer, granted - sent, self.capacity(snap), self.clock())


@dataclass
class Fetched:
    params: dict[str, torch.Tensor]
    outer: OuterState
    digest: str
    bytes_received: int
    seconds: float
    sources: dict[str, int]  # peer -> chunks it delivered


def _parse_manifest(raw: Any, digest: str) -> tuple[Layout, dict[str, Any], int, list[str]]:
    if not isinstance(raw, dict) or raw.get("digest") != digest:
        raise StateSyncError("manifest names another state")
    layout_raw, outer, numel, hashes = (
        raw.get("layout"),
        raw.get("outer"),
        raw.get("numel"),
        raw.get("chunks"),
    )
    if not isinstance(layout_raw, list) or not isinstance(outer, dict):
        raise StateSyncError("malformed manifest")
    layout: Layout = []
    for item in layout_raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(isinstance(d, int) and d >= 0 for d in item[1])
        ):
            raise StateSyncError("malformed manifest layout")
        layout.append((item[0], tuple(item[1])))
    if raw.get("chunk_elems") != CHUNK_ELEMS or not isinstance(numel, int):
        raise StateSyncError("manifest uses another chunking")
    if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 for h in hashes):
        raise StateSyncError("malformed chunk hashes")
    if len(hashes) != len(chunks(numel)):
        raise StateSyncError("chunk count does not match the state size")
    for key, kind in (("lr", float), ("momentum", float), ("nesterov", bool), ("step", int)):
        value = outer.get(key)
        ok = isinstance(value, bool) if kind is bool else isinstance(value, int | float)
        if not ok or (kind is int and (not isinstance(value, int) or isinstance(value, bool))):
            raise StateSyncError(f"manifest outer state has a bad {key!r}")
    return layout, outer, numel, hashes


async def fetch_state(
    node: Any,
    digest: str,
    holders: Sequence[str],
    *,
    expected_layout: Layout | None = None,
    timeout: float = 120.0,
    deadlines: DeadlinePolicy | None = None,
) -> Fetched:
    """Download state ``digest`` from ``holders`` (several at once); verify every chunk and the
    whole. Raises :class:`StateSyncError` if no combination of holders delivers it."""
    start = time.perf_counter()
    me = node.peer_id
    peers = [p for p in holders if p != me][:MAX_SOURCES]
    if not peers:
        raise StateSyncError(f"no peer holds state {digest[:12]}")
    with trio.move_on_after(timeout) as scope:
        # 1. manifests, in parallel; keep the majority's
        manifests: dict[str, tuple[Layout, dict[str, Any], int, list[str]]] = {}

        async def ask(peer: str) -> None:
            try:
                raw = await node.call(
                    peer, "statesync", "manifest", {"digest": digest}, timeout=MANIFEST_TIMEOUT_S
                )
                manifests[peer] = _parse_manifest(raw, digest)
            except (GossamerError, trio.TooSlowError) as exc:
                log.info("state sync: no manifest from %s: %s", peer[-8:], exc)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        if not manifests:
            raise StateSyncError(f"no holder of state {digest[:12]} answered")
        key_of = {
            p: (tuple(m[3]), m[2], repr(m[0]), repr(sorted(m[1].items())))
            for p, m in manifests.items()
        }
        best, _ = Counter(key_of.values()).most_common(1)[0]
        sources = sorted(p for p, k in key_of.items() if k == best)
        layout, outer, numel, hashes = manifests[sources[0]]
        if expected_layout is not None and layout != expected_layout:
            raise StateSyncError(
                "the peers' state does not fit this model (names or shapes differ)"
            )
        if numel != 2 * sum(math.prod(s) for _, s in layout):
            raise StateSyncError("manifest size does not match its layout")

        # 2. chunks, dealt round-robin among the sources; a failing source is dropped
        download = _Download(
            node, digest, torch.empty(numel, dtype=torch.float32), hashes, deadlines
        )
        while download.remaining:
            if not sources:
                raise StateSyncError(f"every holder of state {digest[:12]} failed")
            assignment: dict[str, list[int]] = {p: [] for p in sources}
            for k, index in enumerate(sorted(download.remaining)):
                assignment[sources[k % len(sources)]].append(index)
            async with trio.open_nursery() as nursery:
                for peer, indices in assignment.items():
                    nursery.start_soon(download.pull, peer, indices)
            sources = [p for p in sources if p not in download.failed]
        flat = download.flat

        # 3. the whole state must have the digest the run document names
        params, state = unpack_snapshot(flat, layout, outer)
        actual = await trio.to_thread.run_sync(state_digest, params, state)
        if actual != digest:
            raise StateSyncError(
                f"downloaded state has digest {actual[:12]}, expected {digest[:12]}"
            )
    if scope.cancelled_caught:
        raise StateSyncError(f"state {digest[:12]} did not arrive within {timeout:g} s")
    return Fetched(
        params,
        state,
        digest,
        download.received_bytes,
        time.perf_counter() - start,
        dict(download.delivered),
    )


class _Download:
    """Chunks of one state landing in one preallocated vector, from several sources."""

    def __init__(
        self,
        node: Any,
        digest: str,
        flat: torch.Tensor,
        hashes: list[str],
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self.node = node
        self.deadlines = deadlines or DeadlinePolicy()
        # what each source's chunks took to arrive here (its uplink, our downlink)
        self.inbound = LinkEstimates()
        self.digest = digest
        self.flat = flat
        self.hashes = hashes
        self.spans = chunks(flat.numel())
        self.remaining = set(range(len(self.spans)))
        self.failed: set[str] = set()
        self.delivered: Counter[str] = Counter()
        self.received_bytes = 0

    def _expected(self, peer: str, nbytes: int) -> float | None:
        """Seconds a chunk from ``peer`` should take: measured from it to us; before its first
        chunk, our measured link to it; else like the slowest source measured so far."""
        expected = self.inbound.seconds_for(peer, nbytes)
        if expected is None:
            expected = self.node.dataplane.links.seconds_for(peer, nbytes)
        if expected is None:
            others = [self.inbound.seconds_for(p, nbytes) for p in self.delivered]
            expected = max((e for e in others if e is not None), default=None)
        return expected

    async def _wait_chunk(self, peer: str, pending: Any, nbytes: int, asked: float) -> Any:
        """The chunk, or DeadlineExceeded once it is later than the deadline of what it should
        take; re-judged every second, so a source measured by nothing yet is compared with the
        other sources as soon as they deliver (a stalled one does not keep the ceiling)."""
        while True:
            deadline = asked + self.deadlines.deadline(self._expected(peer, nbytes))
            now = trio.current_time()
            if now >= deadline:
                pending.cancel()
                raise DeadlineExceeded(
                    f"chunk from {peer[-8:]} later than {deadline - asked:.3g} s"
                )
            with trio.move_on_after(min(1.0, deadline - now)):
                return await pending.wait()

    async def pull(self, peer: str, indices: list[int]) -> None:
        """Ask ``peer`` for ``indices``; receive them zero-copy and check each one's hash."""
        if not indices:
            return
        dataplane = self.node.dataplane
        tag = f"ss/{os.urandom(6).hex()}"
        pending = {
            i: dataplane.post_recv(
                peer, f"{tag}/{i}", into={"x": self.flat[self.spans[i][0] : self.spans[i][1]]}
            )
            for i in indices
        }
        try:
            await self.node.call(
                peer,
                "statesync",
                "send",
                {"digest": self.digest, "chunks": indices, "tag": tag},
                timeout=MANIFEST_TIMEOUT_S,
            )
            asked = trio.current_time()
            for i in indices:
                a, b = self.spans[i]
                got = await self._wait_chunk(peer, pending[i], 4 * (b - a), asked)
                now = trio.current_time()
                self.inbound.observe(peer, got.nbytes, now - asked, now)
                asked = now
                actual = await trio.to_thread.run_sync(_sha256, self.flat[a:b])
                if actual != self.hashes[i]:
                    raise StateSyncError(f"chunk {i} from {peer[-8:]} has the wrong hash")
                self.received_bytes += got.nbytes
                self.remaining.discard(i)
                self.delivered[peer] += 1
        except (GossamerError, trio.TooSlowError) as exc:
            log.warning("state sync: dropping source %s: %s", peer[-8:], exc)
            self.failed.add(peer)
        finally:
            dataplane.drop(tag + "/")
