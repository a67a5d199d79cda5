"""Experts on the network: announce, discover, verify, and sample routed across peers.

**Announcing.** A node serving a checkpoint (``serving.py``) announces it three ways, all keyed
by the checkpoint's content id ``cid`` (hex sha256 of its safetensors bytes):

* the run document's experts section: ``experts[<peer>/<cluster>] = {"serving": True, "info":
  {"cid", "kind", "spec", "image_shape", "nbytes", "partition", "addrs"}}`` — signed by the
  serving peer, replicated to every member. The router is announced the same way under the
  reserved cluster number ``ROUTER_SLOT``;
* a DHT provider record for ``cid`` (``/gossamer/providers/<cid>``, one sub-key per serving
  peer, carrying its addresses, cluster and run): any node can find *every* host of one
  checkpoint, members of the run or not;
* a DHT run index ``/gossamer/ddm/<run id>`` (one signed sub-key per serving peer listing its
  checkpoints), so a node that does not replicate the run document can still list its experts.

**Verifying.** An announcement is a claim, and the sampler checks it before it sends a single
request to that host (:class:`Verifier`): (1) the host's ``describe`` must list the announced
``cid`` as an expert of the announced cluster; (2) the weights: fetched once per content id (from
that host, or from a local content-addressed cache), their sha256 must equal ``cid`` — else the
announcement is refused; (3) a challenge: a random probe batch (fresh noise, t spread over
[0, 1], seeded from ``os.urandom``) goes through the host's real ``denoise`` path and the answer
must equal the verified weights' own output (to float32 round-off) — so a host that holds the
announced bytes but computes with other weights is refused too. Refused hosts are never used.
(``verify="hash"`` skips the challenge; ``"none"`` trusts announcements, for benchmarks of the
wire alone.) A host that passes once is trusted for the session; periodic re-challenges are not
implemented.

**Sampling.** ``sample_network`` (in ``async_sampling``, re-exported here) is the core sampler
with the experts called concurrently: each Euler step evaluates the router locally, sends every
chosen expert one batched request for exactly its rows, and combines the answers weighted by the
router's probabilities with the core's own arithmetic — so remote experts give bit for bit what
local ones give. Modes: ``top1``, ``top2``/``topk``, ``full``, and sticky (``sticky_from``; each
expert then gets one ``integrate`` request for its rows' whole remaining trajectory).

**Failures.** A :class:`RemoteExpert` has a list of hosts for its content id. A request goes to
the verified host with the lowest smoothed latency, with a deadline derived from that host's
measured latency (``srtt + 4·rttvar``, times a safety factor, scaled by the batch size; the
verification challenge gives the first measurement). A host that is unreachable or answers badly
is marked down; a host that misses its deadline gets a doubled deadline on the retry and is
marked down after three misses in a row. When no host is left, the expert asks the DHT for more
providers of its ``cid`` (bounded by ``fallback_timeout``), gives hosts that went down over 30 s
ago another chance, verifies them, and carries on; if none answers it raises
``ExpertUnavailable`` and the sampler renormalises over the experts that answer (rows that lose
every expert are re-planned over the survivors). Every wait is bounded, so sampling never hangs
on a dead peer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio

from gossamer.node.errors import DeadlineExceeded, GossamerError
from gossamer.training.diffusion.async_sampling import (
    AsyncExpert,
    LocalExpert,
    ensemble_velocity_network,
    mode_arguments,
    sample_network,
)
from gossamer.training.diffusion.ensemble import ExpertUnavailable
from gossamer.training.diffusion.models import (
    ExpertSpec,
    expert_from_bytes,
    safetensors_metadata,
)
from gossamer.training.diffusion.router import Router
from gossamer.training.diffusion.serving import (
    INLINE_MAX_BYTES,
    ServedCheckpoint,
    content_id,
    describe,
    fetch_checkpoint,
    remote_integrate,
    remote_velocity,
)

if TYPE_CHECKING:
    from gossamer.crdt.sync import Run
    from gossamer.node.node import Node

log = logging.getLogger("gossamer.training.diffusion.network")

ROUTER_SLOT = 1_000_000  # the experts-section cluster number that names a run's router
RUN_INDEX_KIND = "ddm"
ANNOUNCE_TTL_S = 3600.0
CHALLENGE_ROWS = 8
CHALLENGE_RTOL = 1e-4
CHALLENGE_ATOL = 1e-5


class AnnouncementRefused(GossamerError):
    """A host's announcement did not hold up (wrong hash, other weights, not served)."""


def run_index_key(run_id: str) -> str:
    return f"/gossamer/{RUN_INDEX_KIND}/{run_id}"


# ------------------------------------------------------------------------------------ announcing


def announcement_info(node: Node, entry: ServedCheckpoint, partition: str | None) -> dict[str, Any]:
    """What the run document and the DHT say about one served checkpoint."""
    info: dict[str, Any] = {
        "cid": entry.cid,
        "kind": entry.kind,
        "nbytes": len(entry.data),
        "addrs": node.addrs()[:8],
    }
    if entry.spec is not None:
        info["spec"] = entry.spec.to_dict()
        info["image_shape"] = list(entry.image_shape)
    if partition:
        info["partition"] = partition
    return info


async def announce(
    node: Node,
    entries: Sequence[ServedCheckpoint],
    *,
    run: Run | None = None,
    run_id: str | None = None,
    partition: str | None = None,
    ttl: float = ANNOUNCE_TTL_S,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Announce served checkpoints in the run document and (if the node has one) the DHT.

    Experts go under their cluster, routers under ``ROUTER_SLOT``. The DHT part is best effort
    (a swarm of one stores nothing); the returned dict says what was written where.
    """
    run_id = run_id or (run.run_id if run is not None else None)
    written: dict[str, Any] = {"doc": [], "dht": 0}
    for entry in entries:
        slot = ROUTER_SLOT if entry.kind == "router" else entry.cluster
        if slot is None:
            raise ValueError(f"checkpoint {entry.cid[:12]} has no cluster id to announce")
        if run is not None:
            run.doc.serve_expert(slot, True, announcement_info(node, entry, partition))
            written["doc"].append(slot)
    dht = getattr(node, "dht", None)
    if dht is None:
        return written
    expires = time.time() + ttl
    listing = [
        {"cid": e.cid, "kind": e.kind, "cluster": e.cluster, "nbytes": len(e.data)} for e in entries
    ]
    from gossamer.dht import provider_key

    async def put(key: str, value: dict[str, Any]) -> None:
        try:
            written["dht"] += await dht.put(key, value, expires, subkey=node.peer_id)
        except GossamerError as exc:
            log.info("DHT announce of %s failed: %s", key[:60], exc)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for e in entries:
                value = {"addrs": list(dht.own_addrs()), "cluster": e.cluster, "run": run_id}
                nursery.start_soon(put, provider_key(e.cid), value)
            if run_id is not None and entries:
                index = {"checkpoints": listing, "addrs": list(dht.own_addrs())}
                nursery.start_soon(put, run_index_key(run_id), index)
    return written


def withdraw(run: Run, entries: Sequence[ServedCheckpoint]) -> None:
    """Say in the run document that we stop serving (the DHT records simply expire)."""
    for entry in entries:
        slot = ROUTER_SLOT if entry.kind == "router" else entry.cluster
        if slot is not None:
            run.doc.serve_expert(slot, False)


# ------------------------------------------------------------------------------------ discovery


@dataclass
class ExpertRecord:
    """One checkpoint of a run and the peers that announced it."""

    cluster: int  # ROUTER_SLOT for the router
    cid: str
    kind: str = "expert"
    hosts: list[str] = field(default_factory=list)
    nbytes: int = 0
    spec: dict[str, Any] | None = None
    image_shape: list[int] | None = None
    partition: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "cid": self.cid,
            "kind": self.kind,
            "hosts": list(self.hosts),
            "nbytes": self.nbytes,
            "spec": self.spec,
            "image_shape": self.image_shape,
            "partition": self.partition,
        }


@dataclass
class RunExperts:
    """What a run offers: one chosen checkpoint per cluster (and the router), plus the rest."""

    run_id: str
    experts: dict[int, ExpertRecord]
    router: ExpertRecord | None
    candidates: list[ExpertRecord]


def _choose(records: list[ExpertRecord], partition: str | None) -> dict[int, ExpertRecord]:
    """Per cluster, the checkpoint with the most hosts (ties: lowest cid); partition must match."""
    best: dict[int, ExpertRecord] = {}
    for rec in records:
        if partition and rec.partition and rec.partition != partition:
            continue
        cur = best.get(rec.cluster)
        if cur is None or (len(rec.hosts), cur.cid) > (len(cur.hosts), rec.cid):
            best[rec.cluster] = rec
    return dict(sorted(best.items()))


def experts_from_doc(run: Run) -> list[ExpertRecord]:
    """Every (cluster, cid) the run document announces, with its hosts."""
    by_key: dict[tuple[int, str], ExpertRecord] = {}
    for cluster in run.doc.experts():
        for peer, info in run.doc.expert_info(cluster).items():
            cid = info.get("cid")
            if not isinstance(cid, str) or len(cid) != 64:
                continue
            addrs = info.get("addrs")
            if isinstance(addrs, list) and peer != run.node.peer_id:
                good = [a for a in addrs if isinstance(a, str) and a.endswith(f"/p2p/{peer}")]
                if good:
                    run.node.peers.add_addrs(peer, good)
            rec = by_key.setdefault(
                (cluster, cid),
                ExpertRecord(
                    cluster=cluster,
                    cid=cid,
                    kind="router" if cluster == ROUTER_SLOT else "expert",
                    nbytes=int(info.get("nbytes") or 0),
                    spec=info.get("spec") if isinstance(info.get("spec"), dict) else None,
                    image_shape=info.get("image_shape"),
                    partition=info.get("partition")
                    if isinstance(info.get("partition"), str)
                    else None,
                ),
            )
            if peer not in rec.hosts:
                rec.hosts.append(peer)
    return list(by_key.values())


async def experts_from_dht(node: Node, run_id: str, *, timeout: float = 3.0) -> list[ExpertRecord]:
    """The run index in the DHT (empty without a DHT or a record)."""
    dht = getattr(node, "dht", None)
    if dht is None:
        return []
    try:
        record = await dht.get(run_index_key(run_id), timeout=timeout)
    except GossamerError as exc:
        log.info("run index lookup failed: %s", exc)
        return []
    if record is None:
        return []
    by_key: dict[tuple[int, str], ExpertRecord] = {}
    for peer, item in record.subkeys.items():
        value = item.value if isinstance(item.value, dict) else {}
        listing = value.get("checkpoints")
        if not isinstance(listing, list):
            continue
        addrs = value.get("addrs")
        if isinstance(addrs, list) and peer != node.peer_id:
            good = [a for a in addrs[:8] if isinstance(a, str) and a.endswith(f"/p2p/{peer}")]
            if good:
                node.peers.add_addrs(peer, good)
        for item_value in listing[:64]:
            if not isinstance(item_value, dict):
                continue
            cid, kind, cluster = (
                item_value.get("cid"),
                item_value.get("kind"),
                item_value.get("cluster"),
            )
            if not isinstance(cid, str) or len(cid) != 64:
                continue
            slot = ROUTER_SLOT if kind == "router" else cluster
            if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
                continue
            rec = by_key.setdefault(
                (slot, cid),
                ExpertRecord(
                    slot,
                    cid,
                    "router" if kind == "router" else "expert",
                    nbytes=int(item_value.get("nbytes") or 0),
                ),
            )
            if peer not in rec.hosts:
                rec.hosts.append(peer)
    return list(by_key.values())


async def discover(
    node: Node,
    run_id: str,
    *,
    run: Run | None = None,
    partition: str | None = None,
    k: int | None = None,
    use_dht: bool | None = None,
    timeout: float = 3.0,
) -> RunExperts:
    """The experts (and router) of a run: the run document's announcements merged with the DHT's.

    ``partition`` (the recipe digest) filters out checkpoints trained on another partition.
    ``use_dht=None`` asks the DHT's run index only when the run document is not enough (no
    document, or fewer than ``k`` clusters or no router in it).
    """
    records = experts_from_doc(run) if run is not None else []
    if use_dht is None:
        clusters = {r.cluster for r in records}
        use_dht = (
            run is None
            or ROUTER_SLOT not in clusters
            or (k is not None and len(clusters - {ROUTER_SLOT}) < k)
        )
    if use_dht:
        merged = {(r.cluster, r.cid): r for r in records}
        for rec in await experts_from_dht(node, run_id, timeout=timeout):
            mine = merged.setdefault((rec.cluster, rec.cid), rec)
            for host in rec.hosts:
                if host not in mine.hosts:
                    mine.hosts.append(host)
        records = list(merged.values())
    chosen = _choose([r for r in records if r.kind == "expert"], partition)
    routers = _choose([r for r in records if r.kind == "router"], None)
    return RunExperts(run_id, chosen, routers.get(ROUTER_SLOT), records)


# ----------------------------------------------------------------------------------- deadlines


@dataclass
class Latency:
    """Smoothed request latency of one host (RFC 6298 style) and the deadline it implies.

    ``deadline(rows) = clamp(factor · (srtt + 4·rttvar) · max(1, rows / srows), floor, cap)``:
    the usual retransmission bound, times a safety factor for a shared machine, scaled when a
    request carries more rows than the ones measured so far.
    """

    factor: float = 3.0
    floor: float = 0.25
    cap: float = 30.0
    initial: float = 5.0
    srtt: float | None = None
    rttvar: float = 0.0
    srows: float = 1.0

    def observe(self, seconds: float, rows: int) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar, self.srows = seconds, seconds / 2, float(max(rows, 1))
            return
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
        self.srtt = 0.875 * self.srtt + 0.125 * seconds
        self.srows = 0.875 * self.srows + 0.125 * max(rows, 1)

    def deadline(self, rows: int, scale: float = 1.0) -> float:
        if self.srtt is None:
            return min(self.cap, self.initial * scale)
        base = self.factor * (self.srtt + 4 * self.rttvar) * max(1.0, rows / self.srows)
        return min(self.cap, max(self.floor, base) * scale)


# ----------------------------------------------------------------------------------- verifying


class Verifier:
    """Checks announcements against the weights (see the module docstring) and keeps the
    verified weights per content id (in memory, and under ``cache_dir`` if given)."""

    def __init__(
        self,
        node: Node,
        *,
        mode: str = "challenge",
        cache_dir: str | Path | None = None,
        timeout: float = 30.0,
        expected_spec: ExpertSpec | None = None,
        max_bytes: int = 1 << 30,
    ) -> None:
        if mode not in ("challenge", "hash", "none"):
            raise ValueError("verify mode must be 'challenge', 'hash' or 'none'")
        self.node = node
        self.mode = mode
        # A checkpoint names the architecture we build from it: only the run's is accepted
        # (a hostile spec could ask for a model too big for this machine), and its size is
        # bounded before a byte is downloaded.
        self.expected_spec = expected_spec
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timeout = timeout
        self.weights: dict[str, bytes] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.refused: dict[str, str] = {}  # peer id -> reason

    def add_local(self, data: bytes) -> str:
        """Trust bytes we hold ourselves (e.g. our own checkpoint); returns their cid."""
        cid = content_id(data)
        self.weights[cid] = bytes(data)
        return cid

    def check_spec(self, data: bytes, who: str) -> None:
        """Refuse an expert checkpoint whose architecture is not the run's."""
        if self.expected_spec is None:
            return
        try:
            spec = json.loads(safetensors_metadata(data)["gossamer"])["spec"]
        except (KeyError, TypeError, ValueError):
            raise AnnouncementRefused(f"{who} serves an expert without a readable spec") from None
        if spec != self.expected_spec.to_dict():
            raise AnnouncementRefused(
                f"{who} serves architecture {str(spec)[:80]}; the run uses "
                f"{self.expected_spec.to_dict()}"
            )

    def model(self, cid: str) -> torch.nn.Module:
        """The verified weights of ``cid`` as a module (built once)."""
        if cid not in self._models:
            self._models[cid], _, self._shapes[cid] = expert_from_bytes(self.weights[cid])
        return self._models[cid]

    async def weights_for(self, cid: str, peer_id: str, nbytes: int) -> bytes:
        """The bytes of ``cid``: cached, or fetched from ``peer_id`` and hash-checked."""
        lock = self._locks.setdefault(cid, trio.Lock())
        async with lock:
            if cid in self.weights:
                return self.weights[cid]
            path = self.cache_dir / f"{cid}.safetensors" if self.cache_dir is not None else None
            if path is not None and path.exists():
                data = path.read_bytes()
                if content_id(data) == cid:
                    self.weights[cid] = data
                    return data
            data = await fetch_checkpoint(self.node, peer_id, cid, nbytes, timeout=self.timeout)
            got = content_id(data)
            if got != cid:
                raise AnnouncementRefused(
                    f"{peer_id[-8:]} announced checkpoint {cid[:12]} but serves bytes hashing to "
                    f"{got[:12]}"
                )
            self.weights[cid] = data
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            return data

    async def admit(self, host: ExpertHost, record: ExpertRecord) -> None:
        """Verify ``host`` for ``record``; raises AnnouncementRefused (or a network error)."""
        if self.mode == "none":
            return
        answer = await describe(self.node, host.peer_id, timeout=min(self.timeout, 10.0))
        listed = [
            c for c in answer["checkpoints"] if isinstance(c, dict) and c.get("cid") == record.cid
        ]
        if not listed or listed[0].get("kind") != record.kind:
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} announced {record.kind} {record.cid[:12]} "
                "but does not serve it"
            )
        info = listed[0]
        if record.kind == "expert" and info.get("cluster") not in (None, record.cluster):
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} serves {record.cid[:12]} as cluster {info.get('cluster')}, "
                f"announced as {record.cluster}"
            )
        host.inline_max_bytes = min(
            INLINE_MAX_BYTES, int(answer.get("inline_max_bytes") or INLINE_MAX_BYTES)
        )
        host.max_batch = int(answer.get("max_batch") or 1)
        nbytes = int(info.get("nbytes") or record.nbytes or 0)
        if not 0 < nbytes <= self.max_bytes:
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} describes {record.cid[:12]} as {nbytes} bytes "
                f"(accepted: 1..{self.max_bytes})"
            )
        data = await self.weights_for(record.cid, host.peer_id, nbytes)
        if record.kind == "expert":
            self.check_spec(data, host.peer_id[-8:])
        if self.mode == "challenge" and record.kind == "expert":
            await self._challenge(host, record)

    async def _challenge(self, host: ExpertHost, record: ExpertRecord) -> None:
        model = self.model(record.cid)
        shape = self._shapes[record.cid]
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        rows = min(CHALLENGE_ROWS, max(1, host.max_batch))
        x = torch.randn((rows, *shape), generator=gen)
        t = torch.linspace(0.0, 1.0, rows)
        start = time.perf_counter()
        remote = await remote_velocity(
            self.node,
            host.peer_id,
            record.cid,
            x,
            t,
            timeout=self.timeout,
            inline_max_bytes=host.inline_max_bytes,
        )
        host.latency.observe(time.perf_counter() - start, rows)

        def local() -> torch.Tensor:
            with torch.no_grad():
                return model(x, t)

        expected = await trio.to_thread.run_sync(local)
        if not torch.allclose(remote, expected, rtol=CHALLENGE_RTOL, atol=CHALLENGE_ATOL):
            diff = float((remote - expected).abs().max())
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} announced {record.cid[:12]} but its answers differ from "
                f"those weights (max |Δv| = {diff:.3g})"
            )


# ---------------------------------------------------------------------------- remote experts


@dataclass
class ExpertHost:
    """One peer serving one checkpoint, as the sampler sees it."""

    peer_id: str
    state: str = "new"  # new → verified | refused | down
    latency: Latency = field(default_factory=Latency)
    scale: float = 1.0  # deadline multiplier after misses
    misses: int = 0
    requests: int = 0
    rows: int = 0
    failures: int = 0
    inline_max_bytes: int = INLINE_MAX_BYTES
    max_batch: int = 4096
    error: str = ""
    down_at: float = 0.0

    def mark_down(self, error: str) -> None:
        self.state, self.error, self.down_at = "down", error, trio.current_time()

    def stats(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "state": self.state,
            "requests": self.requests,
            "rows": self.rows,
            "failures": self.failures,
            "srtt_ms": None if self.latency.srtt is None else round(self.latency.srtt * 1e3, 3),
            "error": self.error,
        }


class RemoteExpert:
    """An expert callable ``await expert(x_t, t) -> v`` served by one or more peers.

    Raises ``ExpertUnavailable`` only when no host (known or found in the DHT) answers.
    """

    MAX_MISSES = 3
    REFRESH_INTERVAL_S = 5.0  # at most one DHT lookup for more hosts this often
    RETRY_DOWN_S = 30.0  # a host marked down is tried again after this long

    def __init__(
        self,
        node: Node,
        record: ExpertRecord,
        verifier: Verifier,
        *,
        fallback_timeout: float = 2.0,
        use_dht: bool = True,
    ) -> None:
        self.node = node
        self.record = record
        self.verifier = verifier
        self.hosts: dict[str, ExpertHost] = {
            p: ExpertHost(p) for p in record.hosts if p != node.peer_id
        }
        self.fallback_timeout = fallback_timeout
        self.use_dht = use_dht
        self.fallbacks = 0
        self._last_refresh = -1e9

    @property
    def cid(self) -> str:
        return self.record.cid

    def stats(self) -> dict[str, Any]:
        return {
            "cluster": self.record.cluster,
            "cid": self.cid,
            "fallbacks": self.fallbacks,
            "hosts": [h.stats() for h in self.hosts.values()],
        }

    async def admit_all(self) -> int:
        """Verify every new host concurrently; returns how many are usable."""
        async with trio.open_nursery() as nursery:
            for host in self.hosts.values():
                if host.state == "new":
                    nursery.start_soon(self._admit, host)
        return sum(h.state == "verified" for h in self.hosts.values())

    async def _admit(self, host: ExpertHost) -> None:
        try:
            with trio.fail_after(self.verifier.timeout):
                await self.verifier.admit(host, self.record)
            host.state = "verified"
        except AnnouncementRefused as exc:
            host.state, host.error = "refused", str(exc)
            self.verifier.refused[host.peer_id] = str(exc)
            log.warning("refused announcement: %s", exc)
        except (GossamerError, ValueError, trio.TooSlowError) as exc:
            host.mark_down(f"{type(exc).__name__}: {exc}")
            log.info("expert %d host %s unusable: %s", self.record.cluster, host.peer_id[-8:], exc)

    def _pick(self, tried: dict[str, int]) -> ExpertHost | None:
        usable = [
            h
            for h in self.hosts.values()
            if h.state == "verified" and tried.get(h.peer_id, 0) < (2 if h.misses else 1)
        ]
        if not usable:
            return None
        return min(usable, key=lambda h: (h.latency.srtt or 0.0, h.misses, h.peer_id))

    async def _refresh(self) -> bool:
        """No host is left: retry hosts that went down a while ago, ask the DHT for other
        providers of our cid, and verify whichever are new. True if one became usable."""
        now = trio.current_time()
        if now - self._last_refresh < self.REFRESH_INTERVAL_S:
            return False
        self._last_refresh = now
        for host in self.hosts.values():
            if host.state == "down" and now - host.down_at >= self.RETRY_DOWN_S:
                host.state, host.misses, host.scale = "new", 0, 1.0
        dht = getattr(self.node, "dht", None)
        if self.use_dht and dht is not None:
            found = []
            with trio.move_on_after(self.fallback_timeout):
                try:
                    found = await dht.find_providers(self.cid, timeout=self.fallback_timeout)
                except GossamerError as exc:
                    log.info("provider lookup for %s failed: %s", self.cid[:12], exc)
            for provider in found:
                if provider.peer_id not in self.hosts and provider.peer_id != self.node.peer_id:
                    self.hosts[provider.peer_id] = ExpertHost(provider.peer_id)
        if not any(h.state == "new" for h in self.hosts.values()):
            return False
        with trio.move_on_after(self.fallback_timeout + self.verifier.timeout):
            await self.admit_all()
        return any(h.state == "verified" for h in self.hosts.values())

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocities of the rows ``x`` at times ``t`` (one ``denoise`` request)."""

        async def call(host: ExpertHost, timeout: float) -> torch.Tensor:
            return await remote_velocity(
                self.node,
                host.peer_id,
                self.cid,
                x,
                t,
                timeout=timeout,
                inline_max_bytes=host.inline_max_bytes,
            )

        return await self._with_failover(int(x.shape[0]), 1, call)

    async def integrate(self, x: torch.Tensor, start: int, end: int, steps: int) -> torch.Tensor:
        """Rows ``x`` carried from Euler step ``start`` to ``end`` (of ``steps``) by this expert
        alone, in one ``integrate`` request (sticky sampling)."""

        async def call(host: ExpertHost, timeout: float) -> torch.Tensor:
            return await remote_integrate(
                self.node,
                host.peer_id,
                self.cid,
                x,
                start,
                end,
                steps,
                timeout=timeout,
                inline_max_bytes=host.inline_max_bytes,
            )

        return await self._with_failover(int(x.shape[0]), end - start, call)

    async def _with_failover(
        self,
        rows: int,
        units: int,
        call: Callable[[ExpertHost, float], Awaitable[torch.Tensor]],
    ) -> torch.Tensor:
        """Run ``call`` on the best host, failing over to the others (and the DHT's).

        ``units`` is the request's size in single-step requests: the deadline and the latency
        sample scale with it.
        """
        tried: dict[str, int] = {}
        refreshed = False
        while True:
            host = self._pick(tried)
            if host is None:
                if not refreshed and await self._refresh():
                    refreshed = True
                    continue
                raise ExpertUnavailable(
                    f"expert {self.record.cluster} ({self.cid[:12]}): no host answered"
                )
            if tried:
                self.fallbacks += 1
            tried[host.peer_id] = tried.get(host.peer_id, 0) + 1
            deadline = min(
                host.latency.cap * units, host.latency.deadline(rows, host.scale) * units
            )
            start = time.perf_counter()
            try:
                out = await call(host, deadline)
            except DeadlineExceeded as exc:
                host.failures += 1
                host.misses += 1
                host.scale = min(16.0, host.scale * 2)
                host.error = str(exc)
                if host.misses >= self.MAX_MISSES:
                    host.mark_down(str(exc))
                log.info("expert %d on %s: %s", self.record.cluster, host.peer_id[-8:], exc)
                continue
            except (GossamerError, ValueError) as exc:  # unreachable, refused, malformed
                host.failures += 1
                host.mark_down(f"{type(exc).__name__}: {exc}")
                log.warning(
                    "expert %d host %s is down: %s", self.record.cluster, host.peer_id[-8:], exc
                )
                continue
            host.latency.observe((time.perf_counter() - start) / units, rows)
            host.requests += 1
            host.rows += rows * units
            host.misses, host.scale = 0, 1.0
            return out


async def connect_experts(
    node: Node,
    found: RunExperts,
    verifier: Verifier,
    *,
    clusters: Sequence[int] | None = None,
    fallback_timeout: float = 2.0,
    use_dht: bool = True,
) -> dict[int, RemoteExpert]:
    """A verified :class:`RemoteExpert` per cluster that has at least one usable host."""
    wanted = sorted(found.experts) if clusters is None else sorted(clusters)
    experts = {
        c: RemoteExpert(
            node, found.experts[c], verifier, fallback_timeout=fallback_timeout, use_dht=use_dht
        )
        for c in wanted
        if c in found.experts
    }
    async with trio.open_nursery() as nursery:
        for expert in experts.values():
            nursery.start_soon(expert.admit_all)
    usable = {}
    for c, expert in experts.items():
        if any(h.state == "verified" for h in expert.hosts.values()) or await expert._refresh():
            usable[c] = expert
        else:
            log.warning("expert %d: no verified host; sampling without it", c)
    return usable


async def fetch_router(
    node: Node,
    record: ExpertRecord,
    verifier: Verifier,
    expected: Mapping[str, Any] | None = None,
) -> Router:
    """The run's router: its bytes from a host that announced it, hash-checked.

    ``expected`` (the plan's ``{"image_shape", "k", "hidden", "depth"}``) must equal the
    router's own configuration before anything is built from it.
    """
    from gossamer.training.diffusion.router import router_from_bytes

    last: Exception | None = None
    for peer in record.hosts:
        try:
            host = ExpertHost(peer)
            await verifier.admit(host, record)
            data = await verifier.weights_for(record.cid, peer, record.nbytes)
            if expected is not None:
                config = json.loads(safetensors_metadata(data).get("gossamer_router", "null"))
                if config != dict(expected):
                    raise AnnouncementRefused(
                        f"{peer[-8:]} serves a router for {config}; the run's is {dict(expected)}"
                    )
            return router_from_bytes(data)
        except (GossamerError, ValueError, trio.TooSlowError) as exc:
            last = exc
            log.warning("router from %s: %s", peer[-8:], exc)
    raise GossamerError(f"no host served the router {record.cid[:12]}: {last}")


__all__ = [
    "ROUTER_SLOT",
    "AnnouncementRefused",
    "AsyncExpert",
    "ExpertHost",
    "ExpertRecord",
    "Latency",
    "LocalExpert",
    "RemoteExpert",
    "RunExperts",
    "Verifier",
    "announce",
    "connect_experts",
    "discover",
    "ensemble_velocity_network",
    "experts_from_dht",
    "experts_from_doc",
    "fetch_router",
    "mode_arguments",
    "run_index_key",
    "sample_network",
    "withdraw",
]
