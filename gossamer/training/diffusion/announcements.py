"""Announcing served checkpoints, and discovering a run's experts from the announcements.

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

:func:`discover` reads both back (the document first, the DHT's run index when the document
is not enough) and picks one checkpoint per cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from gossamer.dht import DHT, provider_key
from gossamer.node import GossamerError
from gossamer.training.diffusion.serving import ServedCheckpoint

if TYPE_CHECKING:
    from gossamer.crdt import Run
    from gossamer.node import Node

log = logging.getLogger(__name__)

ROUTER_SLOT = 1_000_000  # the experts-section cluster number that names a run's router
RUN_INDEX_KIND = "ddm"
ANNOUNCE_TTL_S = 3600.0


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
    dht = node.service(DHT)
    if dht is None:
        return written
    expires = time.time() + ttl
    listing = [
        {"cid": e.cid, "kind": e.kind, "cluster": e.cluster, "nbytes": len(e.data)} for e in entries
    ]

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
    dht = node.service(DHT)
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
