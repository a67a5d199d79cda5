"""What a DiLoCo member reports: one record per round and the result of its training."""

from __future__ import annotations

from dataclasses import dataclass, field

from gossamer.training.diloco_state import State


@dataclass
class RoundRecord:
    """One round as this member saw it."""

    round: int
    steps: int
    tokens: int
    loss: float
    members: tuple[str, ...]  # whose pseudo-gradients the average holds
    attempts: int
    bytes_sent: int
    seconds_inner: float
    seconds_sync: float
    digest: str  # of S_{round+1}, after the outer step (and any re-fetch)
    parity_ok: bool  # our digest matched the majority's right after the outer step
    parity_compared: int  # digests compared (ours included)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_id: str
    peer_id: str
    records: list[RoundRecord]
    state: State | None
    entered_by: list[str]  # how we (re-)entered: fresh / checkpoint / download / local
    bytes_sent_collective: int
    bytes_received_state: int
    refetches: int

    @property
    def final_digest(self) -> str | None:
        return None if self.state is None else self.state.digest

    @property
    def parity_rounds(self) -> tuple[int, int]:
        """(rounds whose parity check compared ≥ 2 digests and matched, rounds compared)."""
        compared = [r for r in self.records if r.parity_compared >= 2]
        return sum(r.parity_ok for r in compared), len(compared)
