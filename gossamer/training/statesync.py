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
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from gossamer.node import CallContext, GossamerError, Refused, Service
from gossamer.node.rpc import rpc
from gossamer.training.outer import OuterState, state_digest

log = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 20  # 4 MiB of fp32 per chunk
KEEP = 3  # states a member keeps serving
MAX_SOURCES = 8
MAX_CHUNKS_PER_REQUEST = 4096
MANIFEST_TIMEOUT_S = 5.0
MIN_RATE_BYTES_PER_S = 10e6  # a source slower than this for a chunk is dropped

Layout = list[tuple[str, tuple[int, ...]]]


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


class StateService(Service):
    """Serves the states this member holds (``publish`` them as rounds begin)."""

    name = "statesync"

    def __init__(self, node: Any, keep: int = KEEP) -> None:
        self.node = node
        self.keep = keep
        self.snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self.bytes_served = 0

    @classmethod
    def attach(cls, node: Any) -> StateService:
        """The node's state service (registered on first use)."""
        existing = node.service(StateService)
        if existing is not None:
            return existing
        service = cls(node)
        node.register(service)
        node.attach(service)
        return service

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshots[snapshot.digest] = snapshot
        self.snapshots.move_to_end(snapshot.digest)
        while len(self.snapshots) > self.keep:
            self.snapshots.popitem(last=False)

    def _get(self, digest: str) -> Snapshot:
        snap = self.snapshots.get(digest)
        if snap is None:
            raise Refused(f"this member does not hold state {digest[:12]}", "unknown_state")
        return snap

    @rpc
    async def manifest(self, ctx: CallContext, digest: str) -> dict[str, Any]:
        snap = self._get(digest)
        return await trio.to_thread.run_sync(snap.manifest)

    @rpc
    async def send(self, ctx: CallContext, digest: str, chunks: list, tag: str) -> dict[str, Any]:
        snap = self._get(digest)
        count = len(snap.chunk_hashes())
        if not 0 < len(chunks) <= MAX_CHUNKS_PER_REQUEST or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chunks
        ):
            raise Refused(f"chunks must be indices below {count}", "bad_chunks")
        if not tag.startswith("ss/") or len(tag) > 64:
            raise Refused("tag must start with 'ss/' (at most 64 characters)", "bad_tag")
        self.node.nursery.start_soon(self._send_chunks, ctx.peer_id, snap, list(chunks), tag)
        return {"ok": True}

    async def _send_chunks(self, peer: str, snap: Snapshot, indices: list[int], tag: str) -> None:
        spans = chunks(snap.numel)
        for i in indices:
            a, b = spans[i]
            timeout = 5.0 + (b - a) * 4 / MIN_RATE_BYTES_PER_S
            try:
                report = await self.node.dataplane.send(
                    peer, f"{tag}/{i}", {"x": snap.flat[a:b]}, timeout=timeout
                )
            except GossamerError as exc:
                log.info("state sync: sending chunk %d to %s failed: %s", i, peer[-8:], exc)
                return
            self.bytes_served += report.nbytes


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
        download = _Download(node, digest, torch.empty(numel, dtype=torch.float32), hashes)
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

    def __init__(self, node: Any, digest: str, flat: torch.Tensor, hashes: list[str]) -> None:
        self.node = node
        self.digest = digest
        self.flat = flat
        self.hashes = hashes
        self.spans = chunks(flat.numel())
        self.remaining = set(range(len(self.spans)))
        self.failed: set[str] = set()
        self.delivered: Counter[str] = Counter()
        self.received_bytes = 0

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
            for i in indices:
                a, b = self.spans[i]
                got = await pending[i].wait(5.0 + (b - a) * 4 / MIN_RATE_BYTES_PER_S)
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
