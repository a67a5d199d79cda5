"""The iterative Kademlia lookup as a state machine — no I/O, no clock of its own.

The driver asks :meth:`Lookup.next_queries` whom to query (at most ``alpha``
queries making progress at once), reports each answer with
:meth:`on_response` (the contacts the peer returned) or :meth:`on_failure`,
and stops when :attr:`finished`.  A query running longer than ``stall_after``
seconds stops counting against ``alpha``, so one slow peer cannot hold a
lookup back; :meth:`wake_in` tells the driver when that happens next.

A lookup is finished when the ``k`` closest peers it knows of (leaving out
those that failed) have all answered, or when the driver calls :meth:`stop`
(a value was found).  Its result is :meth:`closest`: answered peers, nearest
first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gossamer.dht._routing import peer_key

NEW, IN_FLIGHT, ANSWERED, FAILED = range(4)
MAX_ADDRS = 8
MAX_RETRIES = 2


@dataclass
class Candidate:
    peer_id: str
    addrs: tuple[str, ...]
    distance: int
    state: int = NEW
    sent_at: float = 0.0
    tried: tuple[str, ...] = ()
    retries: int = 0


class Lookup:
    def __init__(
        self,
        target: int,
        seeds: Iterable[tuple[str, Iterable[str]]],
        *,
        k: int = 20,
        alpha: int = 3,
        self_peer_id: str | None = None,
        stall_after: float = math.inf,
        max_candidates: int | None = None,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self.stall_after = stall_after
        self.max_candidates = max_candidates or 8 * k
        self._self = self_peer_id
        self._candidates: dict[str, Candidate] = {}
        self._stopped = False
        self.queries = 0
        self.answers = 0
        self.failures = 0
        self._add(seeds)

    # ------------------------------------------------------------------ input

    def on_response(self, peer_id: str, contacts: Iterable[tuple[str, Iterable[str]]]) -> None:
        candidate = self._candidates.get(peer_id)
        if candidate is None or candidate.state != IN_FLIGHT:
            return
        candidate.state = ANSWERED
        self.answers += 1
        self._add(contacts)

    def on_failure(self, peer_id: str) -> None:
        candidate = self._candidates.get(peer_id)
        if candidate is None or candidate.state != IN_FLIGHT:
            return
        candidate.state = FAILED
        self.failures += 1

    def stop(self) -> None:
        self._stopped = True

    def _add(self, contacts: Iterable[tuple[str, Iterable[str]]]) -> None:
        added = False
        for peer_id, addrs in contacts:
            if peer_id == self._self:
                continue
            known = self._candidates.get(peer_id)
            if known is not None:
                extra = tuple(a for a in addrs if a not in known.addrs and a not in known.tried)
                if known.state == NEW:  # several sources: keep every address, bounded
                    known.addrs = (known.addrs + extra)[:MAX_ADDRS]
                elif known.state == FAILED and extra and known.retries < MAX_RETRIES:
                    # Someone knows an address we have not tried (the peer moved,
                    # e.g. restarted on a new port): ask it again there.
                    known.tried += known.addrs
                    known.addrs = extra[:MAX_ADDRS]
                    known.state = NEW
                    known.retries += 1
                continue
            self._candidates[peer_id] = Candidate(
                peer_id, tuple(addrs), peer_key(peer_id) ^ self.target
            )
            added = True
        if added and len(self._candidates) > self.max_candidates:
            # Forget the farthest peers nobody has asked yet: they cannot matter
            # before every nearer one has, and a flood of contacts stays bounded.
            ranked = sorted(self._candidates.values(), key=lambda c: c.distance)
            for c in ranked[self.max_candidates :]:
                if c.state == NEW:
                    del self._candidates[c.peer_id]

    # ----------------------------------------------------------------- output

    def _window(self) -> list[Candidate]:
        """The k nearest candidates that have not failed."""
        alive = [c for c in self._candidates.values() if c.state != FAILED]
        alive.sort(key=lambda c: c.distance)
        return alive[: self.k]

    @property
    def finished(self) -> bool:
        if self._stopped:
            return True
        return all(c.state == ANSWERED for c in self._window())

    def in_flight(self) -> int:
        return sum(1 for c in self._candidates.values() if c.state == IN_FLIGHT)

    def next_queries(self, now: float) -> list[tuple[str, tuple[str, ...]]]:
        """Peers to query now (marked in flight); empty when waiting or finished."""
        if self.finished:
            return []
        active = sum(
            1
            for c in self._candidates.values()
            if c.state == IN_FLIGHT and now - c.sent_at < self.stall_after
        )
        out = []
        for c in self._window():
            if active >= self.alpha:
                break
            if c.state == NEW:
                c.state = IN_FLIGHT
                c.sent_at = now
                active += 1
                self.queries += 1
                out.append((c.peer_id, c.addrs))
        return out

    def wake_in(self, now: float) -> float:
        """Seconds until a query in flight stalls (and frees a slot); inf if none will."""
        pending = [
            c.sent_at + self.stall_after - now
            for c in self._candidates.values()
            if c.state == IN_FLIGHT and now - c.sent_at < self.stall_after
        ]
        return max(0.0, min(pending)) if pending else math.inf

    def closest(self, n: int | None = None) -> list[tuple[str, tuple[str, ...]]]:
        """Peers that answered, nearest the target first."""
        answered = [c for c in self._candidates.values() if c.state == ANSWERED]
        answered.sort(key=lambda c: c.distance)
        return [(c.peer_id, c.addrs) for c in answered[: self.k if n is None else n]]

    def addrs_of(self, peer_id: str) -> tuple[str, ...] | None:
        candidate = self._candidates.get(peer_id)
        return None if candidate is None else candidate.addrs

    def stuck(self) -> bool:
        """Nothing in flight and nothing left to ask, yet not finished (cannot happen
        by construction; the driver checks it to never wait forever)."""
        return (
            not self.finished
            and self.in_flight() == 0
            and not any(c.state == NEW for c in self._window())
        )
