"""Adaptive deadlines from measured round trips — pure, fed by the DHT.

The same rule as TCP's retransmission timer (RFC 6298): a smoothed round
trip ``srtt`` and its mean deviation ``rttvar`` per peer, timeout
``srtt + 4·rttvar`` clamped to ``[floor, cap]``.  A peer never measured gets
the swarm-wide estimate, plus a dial allowance when we are not connected to
it yet.  A lookup treats a query as stalled (and asks someone else) after
``srtt + 4·rttvar`` of the swarm estimate, with its own floor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ALPHA = 0.125
BETA = 0.25


@dataclass
class _Estimate:
    srtt: float
    rttvar: float

    def observe(self, sample: float) -> None:
        self.rttvar += BETA * (abs(self.srtt - sample) - self.rttvar)
        self.srtt += ALPHA * (sample - self.srtt)


class RttEstimator:
    def __init__(
        self,
        *,
        floor: float = 0.25,
        cap: float = 5.0,
        dial_allowance: float = 2.0,
        stall_floor: float = 0.02,
        max_peers: int = 4096,
    ) -> None:
        self.floor = floor
        self.cap = cap
        self.dial_allowance = dial_allowance
        self.stall_floor = stall_floor
        self._max_peers = max_peers
        self._peers: OrderedDict[str, _Estimate] = OrderedDict()
        self._swarm: _Estimate | None = None

    def observe(self, peer_id: str, seconds: float) -> None:
        estimate = self._peers.get(peer_id)
        if estimate is None:
            self._peers[peer_id] = _Estimate(seconds, seconds / 2)
            if len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
        else:
            estimate.observe(seconds)
            self._peers.move_to_end(peer_id)
        if self._swarm is None:
            self._swarm = _Estimate(seconds, seconds / 2)
        else:
            self._swarm.observe(seconds)

    def forget(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def timeout(self, peer_id: str, connected: bool = True) -> float:
        """Deadline for one call to ``peer_id``.

        A peer we never measured gets the dial allowance even when connected:
        its first call opens a stream on a fresh connection (protocol
        negotiation, often racing identify), which costs far more than a
        round trip on an open stream.
        """
        swarm = self._swarm
        swarm_rto = self.floor if swarm is None else swarm.srtt + 4 * swarm.rttvar
        estimate = self._peers.get(peer_id)
        if estimate is None:
            return min(self.cap, max(self.floor, swarm_rto)) + self.dial_allowance
        # Never shorter than the swarm-wide deadline: a peer measured while we
        # were idle must not be declared failed because *we* are busy now.
        base = max(estimate.srtt + 4 * estimate.rttvar, swarm_rto)
        base = min(self.cap, max(self.floor, base))
        return base if connected else base + self.dial_allowance

    def stall_after(self) -> float:
        """How long a lookup waits on one query before asking another peer too:
        a swarm-wide round trip plus four deviations (a query slower than that
        is unusual, not merely sharing the CPU with its siblings)."""
        if self._swarm is None:
            return max(self.stall_floor, self.floor / 2)
        swarm = self._swarm
        return min(self.cap, max(self.stall_floor, swarm.srtt + 4 * swarm.rttvar))

    def srtt(self, peer_id: str | None = None) -> float | None:
        estimate = self._swarm if peer_id is None else self._peers.get(peer_id)
        return None if estimate is None else estimate.srtt
