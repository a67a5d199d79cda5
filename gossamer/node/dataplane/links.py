"""What the data plane learns about each peer's link from its own transfers, and deadlines from it.

Every send returns once the peer has verified the last byte, so its duration is a round trip
plus the bytes' time on the slower of the two links (and on everything else those links carried
meanwhile).  A small message (< ``BULK_BYTES``) measures the round trip; a bulk one measures the
seconds per byte beyond it.  Both are smoothed (EWMA) per peer.  Callers turn an expected time
into a deadline with a :class:`DeadlinePolicy` (a safety factor, a floor and a ceiling), so no
layer assumes a bandwidth: a deadline is a multiple of what this link did lately, or the
ceiling while nothing has been measured.

Pure: the clock and the samples come from the caller (the data plane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BULK_BYTES = 256 << 10  # below this a transfer's time is mostly the round trip
EWMA_WEIGHT = 0.3  # of a new sample: a few transfers follow a link that changed
MAX_PEERS = 4096  # estimates kept (the least recently measured go first)


@dataclass
class LinkEstimate:
    rtt_s: float | None = None  # round trip of a small message
    seconds_per_byte: float | None = None  # beyond the round trip, for bulk messages
    samples: int = 0
    last: float = 0.0  # when it was last updated

    def seconds_for(self, nbytes: int) -> float | None:
        """Expected seconds to move ``nbytes`` to this peer (None: the rate is not known)."""
        if self.seconds_per_byte is None:
            return None
        return (self.rtt_s or 0.0) + nbytes * self.seconds_per_byte


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_WEIGHT * (new - old)


class LinkEstimates:
    """Per-peer round trips and transfer rates measured on real transfers."""

    def __init__(self) -> None:
        self._peers: dict[str, LinkEstimate] = {}

    def observe(self, peer: str, nbytes: int, seconds: float, now: float) -> None:
        """A transfer of ``nbytes`` to (or from) ``peer`` took ``seconds`` (until verified)."""
        if not (math.isfinite(seconds) and seconds > 0) or nbytes < 0:
            return
        estimate = self._peers.pop(peer, None) or LinkEstimate()
        self._peers[peer] = estimate  # most recently measured last
        if nbytes < BULK_BYTES:
            estimate.rtt_s = _smooth(estimate.rtt_s, seconds)
        else:
            beyond = max(seconds - (estimate.rtt_s or 0.0), seconds / 2)
            estimate.seconds_per_byte = _smooth(estimate.seconds_per_byte, beyond / nbytes)
        estimate.samples += 1
        estimate.last = now
        while len(self._peers) > MAX_PEERS:
            del self._peers[next(iter(self._peers))]

    def get(self, peer: str) -> LinkEstimate | None:
        return self._peers.get(peer)

    def seconds_for(self, peer: str, nbytes: int) -> float | None:
        estimate = self._peers.get(peer)
        return None if estimate is None else estimate.seconds_for(nbytes)

    def rtt(self, peer: str) -> float | None:
        estimate = self._peers.get(peer)
        return None if estimate is None else estimate.rtt_s

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        return {
            peer: {
                "rtt_ms": None if e.rtt_s is None else round(e.rtt_s * 1000, 3),
                "mbit_s": (
                    None if not e.seconds_per_byte else round(8 / e.seconds_per_byte / 1e6, 3)
                ),
                "samples": e.samples,
            }
            for peer, e in self._peers.items()
        }


@dataclass(frozen=True)
class DeadlinePolicy:
    """Expected seconds → a deadline: ``safety`` × expected, within [floor, ceiling]; the ceiling
    when nothing is known."""

    floor: float = 10.0
    ceiling: float = 300.0
    safety: float = 3.0

    def __post_init__(self) -> None:
        if not (0 < self.floor <= self.ceiling and math.isfinite(self.ceiling)):
            raise ValueError("deadlines need 0 < floor <= ceiling < inf")
        if not (math.isfinite(self.safety) and self.safety >= 1):
            raise ValueError("the deadline safety factor must be >= 1")

    def deadline(self, expected: float | None) -> float:
        if expected is None:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.safety * expected))

    def worst(self, expected: list[float | None]) -> float:
        """One deadline for transfers that run together: the slowest measured one's (a peer not
        measured yet is taken to be like the others); the ceiling when none is measured."""
        known = [e for e in expected if e is not None]
        return self.deadline(max(known) if known else None)


__all__ = ["BULK_BYTES", "DeadlinePolicy", "LinkEstimate", "LinkEstimates"]
