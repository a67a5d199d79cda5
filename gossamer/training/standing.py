"""Who has earned a say in a run, from what one member saw of its rounds: pure, no I/O.

Peer ids are free and open runs let anyone write a round entry, so counting entries is
counting whatever a stranger cares to create. :class:`Standing` keeps, per member:

* **veterans** — peers that were in the membership of an all-reduce this member committed.
  A fake member never gets there: it would have to send a contribution that every owner
  accepts. Parity and the run's position (:mod:`.rounds`) count veterans (and the peers the
  charter names: hosts and the allow-list) before anyone else.
* **misses** — a peer that was a candidate of a round's all-reduce (it announced the round and
  heartbeats) but is not in the committed membership missed it: it never showed up (a sybil,
  a crashed or very slow member) or the others put it out (it lied: vetoed, owned a part
  badly, signed two pieces, accused alone). After ``grace`` misses in a row it is skipped for
  ``2^(misses - grace)`` rounds (at most ``max_skip``): it stops costing every round its join
  deadline and a retry, and a peer that comes back and contributes is counted again at once.
* **lone accusations** — an owner that leaves out of its part a contributor no other owner
  left out is believed for its own part (one owner cannot drop a member), but an honest owner
  does that only when a piece happens to arrive late. One that does it in ``accusation_limit``
  of the last ``accusation_window`` rounds is treated as missing them: it backs off like a
  peer that keeps missing rounds.

Deterministic for members that saw the same rounds, so their candidate lists agree.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class Standing:
    grace: int = 1  # misses in a row forgiven (a member can miss a round by bad luck)
    max_skip: int = 64  # rounds
    veterans: set[str] = field(default_factory=set)
    misses: dict[str, int] = field(default_factory=dict)
    skip_until: dict[str, int] = field(default_factory=dict)  # peer -> first round it counts
    accusation_window: int = 8
    accusation_limit: int = 3
    accused_in: dict[str, list[int]] = field(default_factory=dict)  # owner -> rounds

    def record_lone_exclusions(self, round_: int, owners: Collection[str]) -> None:
        """In round ``round_`` each of ``owners`` left out a contributor no one else did."""
        for owner in set(owners):
            recent = [
                r for r in self.accused_in.get(owner, []) if r > round_ - self.accusation_window
            ]
            recent.append(round_)
            self.accused_in[owner] = recent
            if len(recent) >= self.accusation_limit:
                self.accused_in[owner] = []
                self.record(round_, [owner], [])  # as if it had missed this round
                missed = self.misses[owner]
                skip = min(self.max_skip, 2 ** max(1, missed - self.grace))
                self.skip_until[owner] = round_ + 1 + skip

    def note_veterans(self, committed: Collection[str]) -> None:
        """The members of an all-reduce we just committed: veterans at once (what counts in
        parity must not wait for the round's lessons, which overlapped rounds apply late)."""
        self.veterans |= set(committed)

    def record(self, round_: int, candidates: Collection[str], committed: Collection[str]) -> None:
        """Round ``round_``'s all-reduce was proposed to ``candidates`` and committed with
        ``committed``."""
        done = set(committed)
        self.note_veterans(done)
        for peer in done:
            self.misses.pop(peer, None)
            self.skip_until.pop(peer, None)
        for peer in set(candidates) - done:
            missed = self.misses.get(peer, 0) + 1
            self.misses[peer] = missed
            if missed > self.grace:
                skip = min(self.max_skip, 2 ** (missed - self.grace))
                self.skip_until[peer] = round_ + 1 + skip

    def skipped(self, peer: str, round_: int) -> bool:
        """Leave ``peer`` out of round ``round_``'s candidates?"""
        return self.skip_until.get(peer, -1) > round_

    def is_veteran(self, peer: str) -> bool:
        return peer in self.veterans
