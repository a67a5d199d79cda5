"""Per-peer budgets for work a peer can make us do (pure: the clock is injected).

:class:`PeerBudget` is a token bucket per peer: ``capacity`` units at most, refilled at
``rate`` units per second; a request that costs more than the peer has left is refused (and
costs nothing).  :class:`InFlight` caps the jobs one peer has running at once.  Both remember a
bounded number of peers, so a swarm of fresh peer ids cannot grow them without bound; a peer
that is forgotten starts again with a full bucket, which is what a new peer gets anyway — the
global limits (the number of connections, the node's worker threads) bound what many peers do
together.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PEERS = 4096


class PeerBudget:
    def __init__(
        self,
        capacity: float,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = MAX_PEERS,
    ) -> None:
        if capacity <= 0 or rate < 0:
            raise ValueError("a budget needs capacity > 0 and rate >= 0")
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (level, at)

    def left(self, peer_id: str) -> float:
        level, at = self._buckets.get(peer_id, (self.capacity, self._clock()))
        return min(self.capacity, level + (self._clock() - at) * self.rate)

    def take(self, peer_id: str, cost: float) -> bool:
        """Spend ``cost`` of ``peer_id``'s budget if it has that much; False (and nothing
        spent) if not."""
        now = self._clock()
        level = self.left(peer_id)
        if cost > level:
            return False
        self._buckets[peer_id] = (level - cost, now)
        self._buckets.move_to_end(peer_id)
        while len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)
        return True


class InFlight:
    """At most ``limit`` jobs per peer at once: ``if flights.start(peer): try … finally
    flights.end(peer)``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._running: dict[str, int] = {}

    def start(self, peer_id: str) -> bool:
        running = self._running.get(peer_id, 0)
        if running >= self.limit:
            return False
        self._running[peer_id] = running + 1
        return True

    def end(self, peer_id: str) -> None:
        running = self._running.get(peer_id, 0) - 1
        if running > 0:
            self._running[peer_id] = running
        else:
            self._running.pop(peer_id, None)

    def running(self, peer_id: str) -> int:
        return self._running.get(peer_id, 0)


__all__ = ["InFlight", "PeerBudget"]
