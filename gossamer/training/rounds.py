"""The round state machine of a DiLoCo run: pure functions of the run document's round entries.

No I/O, no clock, no torch: :mod:`gossamer.training.diloco` reads the run document, calls these,
and acts on the answers. Every member evaluates them on its own replica, so they are written to
give the same answer on replicas that hold the same entries.

Numbering. Round ``r`` is the r-th outer step. State ``S_r`` (parameters + outer optimizer state,
``outer_state.step == r``) is what every member holds when round ``r`` starts; the all-reduce
and outer step of round ``r`` turn it into ``S_{r+1}``.

What a member writes in the run document (``rounds/<peer>``, forward-only, see crdt/rules.py):

* ``(r, "joined")`` — "I want to take part from round r on" (a newcomer, or a member that lost
  track); it holds no state for r yet;
* ``(r, "training", hash=digest(S_r))`` — "I start round r from the state with this digest";
  this is how members publish their parity digest: the digest after the outer step of round
  r−1 is the one they start round r with;
* ``(r, "syncing", hash)`` — "I closed my inner steps of round r and entered the all-reduce";
  members that see it close their own inner loop early (heterogeneous workers, below);
* ``(r, "done", hash)`` — the run's last state (no round r will be trained);
* ``(r, "failed")`` — "I dropped out of round r" (e.g. the others dropped me).

Closing a round. A member runs inner steps until one of: it has taken ``inner_steps`` (H); it has
taken at least ``min_inner_steps`` and another member already closed round r (status syncing),
or ``round_seconds`` have passed. So a slower worker contributes fewer inner steps (the average is
tokens-weighted) instead of holding up the round. ``min_inner_steps == inner_steps`` (the
default) makes every member take exactly H steps, which the bit-exact tests need.

Membership. The all-reduce of round r is among the live members whose entry says
``(r, joined|training|syncing)`` (a newcomer that announced round r is waited for); the
collective then agrees on a common list, so replicas that differ slightly still meet. A member
that finds most of the run past its round (it was dropped, or fell behind) does not train or
average that round: it re-enters the run like a newcomer.

Parity. After the outer step of round r, each member writes ``(r+1, training, digest)``, waits
briefly for the round's other members to do the same, and compares: the digest held by the most
live members at step r+1 wins (ties: the digest of the smallest peer id). A member outside the
majority re-fetches the majority's state (:mod:`gossamer.training.statesync`).

Entering a run. See :func:`plan_entry`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ACTIVE",
    "WITH_STATE",
    "EntryPlan",
    "ParityVerdict",
    "RoundPolicy",
    "RunPosition",
    "others_closing",
    "parity",
    "parity_digests",
    "plan_entry",
    "round_members",
    "run_position",
]

ACTIVE = ("training", "syncing")  # in a round, holding its start state
WITH_STATE = ("training", "syncing", "done")  # entries whose hash is a state digest


class Entry(Protocol):
    """What the functions here read from a round entry (crdt's ``RoundEntry`` fits)."""

    peer_id: str
    step: int
    status: str
    hash: Any
    recent: tuple[tuple[int, Any], ...]  # (step, digest) of the states it held lately


Entries = Mapping[str, Entry]
Live = Callable[[str], bool]


def _always(_: str) -> bool:
    return True


@dataclass(frozen=True)
class RoundPolicy:
    """When a member closes its inner loop (see the module docstring)."""

    inner_steps: int
    min_inner_steps: int | None = None  # None: = inner_steps (everyone takes exactly H)
    round_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError("inner_steps must be >= 1")
        low = self.min_steps
        if not 1 <= low <= self.inner_steps:
            raise ValueError("min_inner_steps must be between 1 and inner_steps")
        if self.round_seconds is not None and not self.round_seconds > 0:
            raise ValueError("round_seconds must be positive")

    @property
    def min_steps(self) -> int:
        return self.inner_steps if self.min_inner_steps is None else self.min_inner_steps

    def should_close(self, steps: int, elapsed: float, others_closed: bool) -> bool:
        """Close after ``steps`` inner steps and ``elapsed`` seconds in this round?"""
        if steps >= self.inner_steps:
            return True
        if steps < self.min_steps:
            return False
        if others_closed:
            return True
        return self.round_seconds is not None and elapsed >= self.round_seconds


@dataclass(frozen=True)
class RunPosition:
    """Where the run is: its highest round with live members holding state, and that state."""

    round: int | None  # None: nobody live holds any state (a new run, or everyone left)
    digest: str | None  # the majority digest at that round
    holders: tuple[str, ...]  # live peers holding it (sorted)
    finished: bool = False  # the holders declared the run done at this round


def _hash_str(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value).hex()
    return None


def _majority(digests: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """(digest, sorted holders) held by the most peers; ties go to the smallest peer id's."""
    counts = Counter(digests.values())
    best = max(counts.values())
    tied = {d for d, c in counts.items() if c == best}
    winner = digests[min(p for p, d in digests.items() if d in tied)]
    return winner, tuple(sorted(p for p, d in digests.items() if d == winner))


def run_position(entries: Entries, live: Live = _always) -> RunPosition:
    """The run's current round and state, from the entries of live members.

    The round is the one the most live members hold state for (ties: the later round), so a
    single member racing ahead on its own — broken or lying — cannot drag the run after it;
    the digest is that round's majority digest.
    """
    with_state = {
        p: e
        for p, e in entries.items()
        if e.status in WITH_STATE and _hash_str(e.hash) is not None and live(p)
    }
    if not with_state:
        return RunPosition(None, None, ())
    counts = Counter(e.step for e in with_state.values())
    step = max(counts, key=lambda s: (counts[s], s))
    at_step = {p: e for p, e in with_state.items() if e.step == step}
    digest, holders = _majority({p: _hash_str(e.hash) or "" for p, e in at_step.items()})
    finished = all(at_step[p].status == "done" for p in holders)
    return RunPosition(step, digest, holders, finished)


def round_members(
    entries: Entries, step: int, me: str, live: Live = _always, *, overlapped: bool = False
) -> list[str]:
    """Who takes part in round ``step``'s all-reduce, as this member sees it (sorted, with us).

    Every live member that declared the round: in it (training, syncing) or announced for it
    (joined: a newcomer fetching the state; the all-reduce waits for it until its join
    deadline). Whatever start digest a member declared: one whose entry is stale (it is
    re-fetching) still contributes a valid pseudo-gradient, and leaving it out on some replicas
    but not others would only split the membership agreement; parity after the outer step
    catches a member that really started from other bits.

    ``overlapped`` (streaming and eager rounds): a member still in round ``step − 1``
    (training or syncing) is in round ``step`` too. It writes ``(step, training)`` only once
    its last exchange of round ``step − 1`` is merged, a step or so before its first exchange
    of round ``step`` starts — too late for the others' views: leaving it out would let two
    members that have not yet seen each other's new entries each average alone.
    """
    out = {me}
    for p, e in entries.items():
        if not live(p):
            continue
        in_round = e.step == step and e.status in ("joined", *ACTIVE)
        finishing_last = overlapped and e.step == step - 1 and e.status in ACTIVE
        if in_round or finishing_last:
            out.add(p)
    return sorted(out)


def others_closing(entries: Entries, step: int, me: str) -> bool:
    """Has another member closed round ``step`` (entered its all-reduce)?"""
    return any(
        p != me and e.step == step and e.status in ("syncing", "done") for p, e in entries.items()
    )


def parity_digests(entries: Entries, step: int, live: Live = _always) -> dict[str, str]:
    """The state digests live members published for round ``step``: in their entry, or in
    its history if they moved on (overlapped rounds: a member may publish round r+1 before
    another reads the document to check round r)."""
    out = {}
    for p, e in entries.items():
        if not live(p):
            continue
        h = _hash_str(e.hash)
        if e.step == step and e.status in WITH_STATE and h is not None:
            out[p] = h
        elif e.step > step:
            earlier = next((_hash_str(d) for s, d in reversed(e.recent) if s == step), None)
            if earlier is not None:
                out[p] = earlier
    return out


def parity_pending(
    entries: Entries, step: int, peers: Collection[str], live: Live = _always
) -> list[str]:
    """Peers of the last all-reduce that have not yet published their digest for ``step``."""
    waiting = []
    for p in peers:
        e = entries.get(p)
        if not live(p) or (e is not None and (e.step > step or e.status == "failed")):
            continue  # gone, moved on or dropped out: nothing to wait for
        if e is None or e.step < step or _hash_str(e.hash) is None:
            waiting.append(p)
    return sorted(waiting)


@dataclass(frozen=True)
class ParityVerdict:
    ok: bool  # our digest is the majority's
    digest: str  # the majority digest
    holders: tuple[str, ...]  # peers that hold it
    compared: int  # digests compared, ours included
    dissent: tuple[str, ...] = ()  # peers whose digest differs from the majority


def parity(me: str, mine: str, digests: Mapping[str, str]) -> ParityVerdict:
    """Compare our digest with the others' (``digests`` may include us; ours wins for us)."""
    all_digests = {**digests, me: mine}
    digest, holders = _majority(all_digests)
    dissent = tuple(sorted(p for p, d in all_digests.items() if d != digest))
    return ParityVerdict(digest == mine, digest, holders, len(all_digests), dissent)


@dataclass(frozen=True)
class EntryPlan:
    """How a member enters a run (see :func:`plan_entry`)."""

    action: str  # "start" | "resume" | "gather" | "announce" | "wait" | "finished"
    round: int | None = None
    digest: str | None = None
    holders: tuple[str, ...] = ()


def plan_entry(
    position: RunPosition,
    my_entry: Entry | None,
    *,
    is_host: bool,
    checkpoint_round: int | None,
    lead: int = 1,
) -> EntryPlan:
    """What a member that is not yet training should do next.

    * ``finished``: the run is done; nothing to train.
    * ``start(r, digest, holders)``: enter round r from the state with ``digest`` — our own if
      our checkpoint or fresh model has that digest, otherwise downloaded from ``holders``.
      We may enter the run's current round r only if we announced ourselves for r before it
      started (our entry is ``(r, joined)``); otherwise the others may already be averaging.
    * ``announce(r)``: write ``(r, joined)`` and wait for round r to start: ``lead`` rounds after
      the current one. Overlapped rounds (streaming, eager) start their first exchange a few
      steps after their state appears, so a newcomer announcing for the next round gives its
      entry less than a round to reach everyone; they announce two rounds ahead.
    * ``resume(round)``: nobody live holds state; continue from our checkpoint.
    * ``gather``: nobody holds state and we have no checkpoint, but we are a host: start the run
      from our own fresh state (after waiting for the run's minimum number of workers).
    * ``wait``: nobody holds state and we cannot start it: announce round 0 and wait.
    """
    if position.round is None:
        if checkpoint_round is not None:
            return EntryPlan("resume", checkpoint_round)
        if is_host:
            return EntryPlan("gather", 0)
        return EntryPlan("wait", 0)
    r = position.round
    if position.finished:
        return EntryPlan("finished", r, position.digest, position.holders)
    if my_entry is not None and my_entry.step == r and my_entry.status == "joined":
        return EntryPlan("start", r, position.digest, position.holders)
    if my_entry is not None and my_entry.step > r:
        return EntryPlan("wait", my_entry.step)  # announced already; the run is not there yet
    return EntryPlan("announce", r + max(1, lead))
