"""The peer table: what this node knows about each peer, and its connection limits.

Pure bookkeeping (no I/O): the node feeds it connection events, RPC activity
and ping results; the CLI and the layers above read it.  Latency is an EWMA of
measured round trips so one slow ping does not mark a peer slow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

LATENCY_EWMA_WEIGHT = 0.3
MAX_ADDRS_PER_PEER = 16


@dataclass
class PeerInfo:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    connected: bool = False
    direction: str = ""  # "inbound" | "outbound" | ""
    connections: int = 0
    latency_ms: float | None = None
    last_seen: float | None = None  # wall clock, seconds
    first_seen: float = field(default_factory=time.time)
    bootstrap: bool = False
    failures: int = 0
    remote_addr: str = ""
    relayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "connected": self.connected,
            "direction": self.direction,
            "connections": self.connections,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "last_seen": self.last_seen,
            "bootstrap": self.bootstrap,
            "failures": self.failures,
            "remote_addr": self.remote_addr,
            "relayed": self.relayed,
        }


class PeerTable:
    """Peer id → :class:`PeerInfo`, bounded in size."""

    def __init__(self, max_peers: int = 10_000) -> None:
        self._peers: dict[str, PeerInfo] = {}
        self._max_peers = max_peers

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: str) -> PeerInfo | None:
        return self._peers.get(peer_id)

    def entry(self, peer_id: str) -> PeerInfo:
        info = self._peers.get(peer_id)
        if info is None:
            if len(self._peers) >= self._max_peers:
                self._evict_one()
            info = self._peers[peer_id] = PeerInfo(peer_id)
        return info

    def _evict_one(self) -> None:
        """Forget the disconnected, non-bootstrap peer seen longest ago."""
        candidates = [p for p in self._peers.values() if not p.connected and not p.bootstrap]
        if not candidates:
            return
        oldest = min(candidates, key=lambda p: p.last_seen or p.first_seen)
        del self._peers[oldest.peer_id]

    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        info = self.entry(peer_id)
        for addr in addrs:
            if addr not in info.addrs:
                info.addrs.append(addr)
        del info.addrs[:-MAX_ADDRS_PER_PEER]

    def on_connected(self, peer_id: str, direction: str, remote_addr: str = "") -> None:
        info = self.entry(peer_id)
        info.connections += 1
        info.connected = True
        info.direction = info.direction or direction
        info.failures = 0
        if remote_addr:
            info.remote_addr = remote_addr
            info.relayed = "/p2p-circuit" in remote_addr
        info.last_seen = time.time()

    def on_disconnected(self, peer_id: str) -> None:
        info = self._peers.get(peer_id)
        if info is None:
            return
        info.connections = max(0, info.connections - 1)
        if info.connections == 0:
            info.connected = False
            info.direction = ""

    def on_dial_failed(self, peer_id: str) -> None:
        self.entry(peer_id).failures += 1

    def saw(self, peer_id: str) -> None:
        info = self._peers.get(peer_id)
        if info is not None:
            info.last_seen = time.time()

    def record_latency(self, peer_id: str, rtt_ms: float) -> None:
        info = self.entry(peer_id)
        if info.latency_ms is None:
            info.latency_ms = rtt_ms
        else:
            info.latency_ms += LATENCY_EWMA_WEIGHT * (rtt_ms - info.latency_ms)
        info.last_seen = time.time()

    def connected(self) -> list[PeerInfo]:
        return [p for p in self._peers.values() if p.connected]

    def all(self) -> list[PeerInfo]:
        return list(self._peers.values())
