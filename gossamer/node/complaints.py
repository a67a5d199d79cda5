"""Misbehaviour: log lines at most one per peer per interval (with a count of the rest), and a
score per peer that bans one that keeps at it.

A hostile peer can provoke failures as fast as it can send; logging each one (with a traceback)
turns it into a disk-filling tool.  :class:`Complaints` decides whether a line is due (pure: the
clock is injected) and counts what it held back, so the next line says how many there were.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PEERS = 4096  # peers remembered; the oldest is forgotten first


class Complaints:
    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()  # peer -> (at, held)
        self.total = 0

    def due(self, peer_id: str) -> int | None:
        """None if a line for ``peer_id`` is not due yet (it is counted); else how many
        lines were held back since the last one."""
        self.total += 1
        now = self._clock()
        last = self._last.get(peer_id)
        if last is not None and now - last[0] < self.interval:
            self._last[peer_id] = (last[0], last[1] + 1)
            return None
        self._last[peer_id] = (now, 0)
        self._last.move_to_end(peer_id)
        while len(self._last) > MAX_PEERS:
            self._last.popitem(last=False)
        return 0 if last is None else last[1]

    def log(self, logger: logging.Logger, peer_id: str, message: str, *args: object) -> None:
        """``logger.warning(message)`` for ``peer_id`` when due, naming what was held back."""
        held = self.due(peer_id)
        if held is None:
            return
        suffix = f" (and {held} more from this peer since)" if held else ""
        logger.warning(message + suffix, *(printable(a) if isinstance(a, str) else a for a in args))


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters escaped (a peer's bytes must not be
    able to start a forged line), at most ``limit`` characters."""
    if text.isprintable() and len(text) <= limit:
        return text
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


class Misbehaviour:
    """A score per peer for what it provoked; past ``ban_score`` the peer is banned for
    ``ban_seconds`` (doubling with each ban it earns again, up to ``max_ban_seconds``).

    Scores decay (halving every ``half_life`` seconds), so an honest peer that trips a rule
    now and then never gets there.  ``ban_seconds = 0`` turns banning off.  Pure: the clock is
    injected; the node disconnects and refuses banned peers.
    """

    def __init__(
        self,
        ban_score: float = 100.0,
        ban_seconds: float = 60.0,
        max_ban_seconds: float = 3600.0,
        half_life: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ban_score = ban_score
        self.ban_seconds = ban_seconds
        self.max_ban_seconds = max_ban_seconds
        self.half_life = half_life
        self._clock = clock
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (score, at)
        self._bans: dict[str, tuple[float, int]] = {}  # peer -> (until, times banned)

    def score(self, peer_id: str) -> float:
        score, at = self._scores.get(peer_id, (0.0, self._clock()))
        return score * 0.5 ** ((self._clock() - at) / self.half_life)

    def record(self, peer_id: str, points: float) -> float | None:
        """Add ``points``; the seconds of a ban it has just earned, or None."""
        now = self._clock()
        score = self.score(peer_id) + points
        self._scores[peer_id] = (score, now)
        self._scores.move_to_end(peer_id)
        while len(self._scores) > MAX_PEERS:
            self._scores.popitem(last=False)
        if self.ban_seconds <= 0 or score < self.ban_score or self.banned(peer_id):
            return None
        _, times = self._bans.get(peer_id, (0.0, 0))
        seconds = min(self.max_ban_seconds, self.ban_seconds * 2**times)
        self._bans[peer_id] = (now + seconds, times + 1)
        self._scores[peer_id] = (0.0, now)  # the ban is the consequence: start again after it
        if len(self._bans) > MAX_PEERS:
            for peer in [p for p, (until, _) in self._bans.items() if until <= now]:
                del self._bans[peer]
        return seconds

    def banned_count(self) -> int:
        now = self._clock()
        return sum(1 for until, _ in self._bans.values() if until > now)

    def banned(self, peer_id: str) -> bool:
        ban = self._bans.get(peer_id)
        return ban is not None and ban[0] > self._clock()


__all__ = ["Complaints", "Misbehaviour"]
