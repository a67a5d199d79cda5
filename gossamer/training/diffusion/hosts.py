"""One peer serving one checkpoint, as the sampler sees it: its state and measured latency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from gossamer.training.diffusion.serving import INLINE_MAX_BYTES


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
