"""Who is in an all-reduce: each member's status after an attempt, and agreeing on members.

Before the first attempt and after a failed one the members :func:`agree` on who takes part; the
rule each member applies to the views it hears is :class:`MembershipAgreement`, pure.
After an attempt every member tells every other what it holds (:func:`exchange_statuses`);
:func:`decide` turns the statuses it collected into a :class:`Decision` (commit or retry, and the
next membership), the same on every member that collected the same statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import trio

from gossamer.node import GossamerError, wire
from gossamer.training.collective_evidence import Proof
from gossamer.training.collective_links import Links, wait
from gossamer.training.collective_schedule import AllReduceSchedule, Scope, Tag

log = logging.getLogger(__name__)

AGREEMENT_ROUNDS = 2
MAX_PROOFS = 64

# what each peer said in one agreement round: its view, or None if it sent none we could read
Views = Mapping[str, AbstractSet[str] | None]


@dataclass
class Status:
    """What one member says after an attempt."""

    ok: bool
    missing_parts: list[str] = field(default_factory=list)  # owners whose part never came
    # owner -> contributors summed in every piece of that owner's part this member holds
    contributors: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # contributor -> why (as an owner)
    disputed: list[str] = field(default_factory=list)  # owners whose part I verified: wrong
    mismatched: list[str] = field(default_factory=list)  # owners whose bytes ≠ their verifier's
    # proofs that a contributor signed two different pieces (collective_evidence)
    proofs: list[Proof] = field(default_factory=list)

    def pack(self) -> bytes:
        return wire.pack(
            {
                "ok": self.ok,
                "m": self.missing_parts,
                "c": self.contributors,
                "r": self.refused,
                "d": self.disputed,
                "x": self.mismatched,
                "q": [proof.pack() for proof in self.proofs],
            }
        )

    @classmethod
    def unpack(cls, data: bytes, members: Sequence[str]) -> Status:
        raw = wire.unpack(data)
        known = set(members)
        if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
            raise ValueError("malformed status")
        missing, contributors, refused = raw.get("m"), raw.get("c"), raw.get("r")
        if not isinstance(missing, list) or not isinstance(contributors, dict):
            raise ValueError("malformed status fields")
        if not isinstance(refused, dict):
            raise ValueError("malformed status refusals")
        if not all(isinstance(v, list) for v in contributors.values()):
            raise ValueError("malformed contributor lists")
        disputed, mismatched = raw.get("d", []), raw.get("x", [])
        if not isinstance(disputed, list) or not isinstance(mismatched, list):
            raise ValueError("malformed status verdicts")
        raw_proofs = raw.get("q", [])
        if not isinstance(raw_proofs, list) or len(raw_proofs) > MAX_PROOFS:
            raise ValueError(f"a status carries at most {MAX_PROOFS} proofs")
        proofs = [Proof.unpack(p) for p in raw_proofs]
        names = [
            *missing,
            *contributors,
            *refused,
            *disputed,
            *mismatched,
            *(proof.peer for proof in proofs),
            *(p for v in contributors.values() for p in v),
        ]
        if not all(isinstance(p, str) and p in known for p in names):
            raise SplitView("status names peers outside the attempt")
        return cls(
            raw["ok"],
            missing,
            {k: list(v) for k, v in contributors.items()},
            {k: str(v)[:200] for k, v in refused.items()},
            sorted(set(disputed)),
            sorted(set(mismatched)),
            proofs,
        )


class Decision(NamedTuple):
    """What a member makes of an attempt's statuses."""

    commit: bool
    members: list[str]  # the membership of the next attempt (sorted); all of them on commit
    disputes: tuple[tuple[str, str], ...] = ()  # (owner, verifier) pairs that disagreed
    # (owner, contributor): a contributor only that owner left out (it stays; see Standing)
    lone_exclusions: tuple[tuple[str, str], ...] = ()


def decide(
    members: Sequence[str],
    statuses: Mapping[str, Status],
    verifier_of: Mapping[str, str] | None = None,
    partners: Mapping[str, AbstractSet[str]] | None = None,
) -> Decision:
    """Commit or retry, and the next membership, from the statuses a member collected (its own
    included).  Deterministic: members that collected the same statuses decide the same.

    A status speaks only for its sender, so no lone member can veto a round:

    * a member that sent no status (it died, or its status was lost) blocks nothing by its
      silence: what it would have said about others is not heard, and the statuses we have
      decide. It is left out of a retry. (A status that reached only some members before its
      sender died must not split their decisions: those that heard it would commit and the
      others retry alone. The parts it owed are judged by the others' words, as for any
      owner, except that a part even one member lacks puts a silent owner out.)
    * an owner whose part two or more members lack is out, and so is one that says its own
      part failed; a part that only one member lacks puts *that member* out (it cannot
      complete; the owner served everyone else), never the owner;
    * a contributor left out of the parts of two or more owners (refused, or too late) is
      out; one left out by a single owner stays, and only that owner's part goes without it,
      so one owner cannot drop a member from the round;
    * a member that reports failure without naming a part it lacks is out;
    * a contributor a valid :class:`~.collective_evidence.Proof` shows two-faced is out;
    * verification (``verifier_of``: owner -> its part's verifier this attempt): a verifier
      that found an owner's part wrong, or two or more members whose bytes differ from the
      verifier's digest, make the pair (owner, verifier) a *dispute*; the attempt cannot commit
      and is retried with the same members, the parts re-paired. One member's word cannot
      tell the liar of a pair, but a liar disagrees with every partner: a member in disputes
      with two different members, in two attempts or more (``partners``: this all-reduce's
      earlier disputes), is out.
      One member alone claiming a mismatch is out (it cannot complete, as for a missing part).

    The round commits when nobody is out and nothing is disputed.
    """
    full = set(members)
    silent = {p for p in members if p not in statuses}
    out: set[str] = set()
    lacking: dict[str, set[str]] = {}
    for sender, status in statuses.items():
        for owner in status.missing_parts:
            lacking.setdefault(owner, set()).add(sender)
        if not status.ok and not status.missing_parts:
            out.add(sender)
    for owner, claimants in sorted(lacking.items()):
        if owner in out:
            continue
        if owner in silent or owner in claimants or len(claimants) >= 2:
            # a silent owner cannot say it served the claimant: its silence and a missing
            # part put it out, never the one member that lacks it (it may have died mid-part)
            out.add(owner)
        else:
            out.update(claimants)
    # who an owner left out of its part: its own word only (what others relay of its masks
    # would let one member speak for every owner)
    excluded_by: dict[str, set[str]] = {}
    for owner, status in statuses.items():
        left_out = set(status.refused)
        summed = status.contributors.get(owner)
        if summed is not None:
            left_out |= full - set(summed)
        for contributor in left_out:
            excluded_by.setdefault(contributor, set()).add(owner)
    for contributor, owners in sorted(excluded_by.items()):
        if len(owners - out - {contributor}) >= 2:
            out.add(contributor)
    disputes: set[tuple[str, str]] = set()
    verifier_of = verifier_of or {}
    mismatch_claims: dict[str, set[str]] = {}
    for sender, status in statuses.items():
        for owner in status.disputed:
            if verifier_of.get(owner) == sender and owner != sender:
                disputes.add((owner, sender))
        for owner in status.mismatched:
            mismatch_claims.setdefault(owner, set()).add(sender)
    for owner, claimants in sorted(mismatch_claims.items()):
        verifier = verifier_of.get(owner)
        if verifier is None or owner in out:
            continue
        if len(claimants - {owner, verifier}) >= 2:
            disputes.add((owner, verifier))
        else:
            out.update(claimants - {owner, verifier})
    for status in statuses.values():
        # checked against the signatures by exchange_statuses: whoever relays it, it stands
        out.update(proof.peer for proof in status.proofs if proof.peer in full)
    earlier = partners or {}
    seen: dict[str, set[str]] = {p: set(v) for p, v in earlier.items()}
    for a, b in disputes:
        seen.setdefault(a, set()).add(b)
        seen.setdefault(b, set()).add(a)
    # out: in disputes with two different members, over two attempts at least (one attempt's
    # disputes can all be one slow moment; a liar disagrees again once re-paired)
    out.update(p for p in full if earlier.get(p) and len(seen.get(p, set())) >= 2)
    lone = tuple(
        sorted(
            (owner, contributor)
            for contributor, owners in excluded_by.items()
            if contributor not in out
            for owner in owners - out - {contributor}
            if len(owners - out - {contributor}) == 1
        )
    )
    commit = not out and not disputes
    return Decision(
        commit, sorted(full if commit else full - out - silent), tuple(sorted(disputes)), lone
    )


@dataclass
class MembershipAgreement:
    """One member's side of :func:`agree`, without the messages: whom to ask, and what to keep.

    The rule: the proposal is sorted and deduplicated. The agreement is over after
    :data:`AGREEMENT_ROUNDS` rounds, or before a round once the proposal is only ``me`` or no
    longer holds ``me``. In a round ``me`` sends its proposal to every other peer in it (the
    :attr:`peers`) and keeps the intersection of its proposal with every view it heard; a view
    without ``me`` counts as the proposal without that peer, and so does no view at all —
    except in the last round, where silence drops nobody. (The last round spreads what the
    first learned; a peer that dies during it, after sending its view to some members and not
    to others, would otherwise stay with the first and be dropped by the others — a split
    that costs every member a re-entry. Kept by all, the dead peer only costs the attempt
    that follows, whose statuses put it out.)
    """

    me: str
    proposal: list[str]
    round: int = 0

    def __post_init__(self) -> None:
        self.proposal = sorted(set(self.proposal))

    @property
    def done(self) -> bool:
        if self.round >= AGREEMENT_ROUNDS:
            return True
        return self.proposal == [self.me] or self.me not in self.proposal

    @property
    def peers(self) -> list[str]:
        """Whom this round's proposal goes to and whose views it waits for."""
        return [p for p in self.proposal if p != self.me]

    def counted_views(self, views: Views) -> list[set[str]]:
        """The sets the round intersects: the proposal, then one per peer, as the rule counts it."""
        counted = [set(self.proposal)]
        last = self.round == AGREEMENT_ROUNDS - 1
        for peer in self.peers:
            view = views.get(peer)
            if view is None and last:
                continue
            if view is None or self.me not in view:
                counted.append(set(self.proposal) - {peer})
            else:
                counted.append(set(view))
        return counted

    def on_views(self, views: Views) -> list[str]:
        """End the round with the views heard (a peer missing from ``views`` sent none)."""
        if self.done:
            raise ValueError("the agreement is over")
        self.proposal = sorted(set.intersection(*self.counted_views(views)))
        self.round += 1
        return self.proposal


class SplitView(ValueError):
    """A status naming peers outside our attempt: its sender agreed on another membership."""


async def exchange_statuses(
    links: Links,
    schedule: AllReduceSchedule,
    mine: Status,
    not_before: float | None = None,
    split: set[str] | None = None,
) -> dict[str, Status]:
    """Send our status to every other member and collect theirs (ours included), by one deadline.

    ``not_before``: the attempt's own last deadline (its all-gather's). A member that is done
    early waits for the others' statuses until then at least: a verifier, or an owner that
    waited out a late piece, may still be working within the attempt's deadlines, and it is
    no more silent than they allow.

    ``split``: filled with the peers whose status named peers outside the attempt (their
    membership agreement ended elsewhere: a member died between its rounds); their status is
    left out like a malformed one."""
    statuses = {links.me: mine}
    payload = {"s": mine.pack()}
    timeout = _message_timeout(links)
    deadline = trio.current_time() + timeout
    if not_before is not None:
        deadline = max(deadline, not_before + timeout)
    tag = schedule.status_tag
    pending = {p: links.node.dataplane.post_recv(p, tag) for p in schedule.others}
    unreachable = await links.send_all(list(pending), tag, payload, deadline)
    for peer, receive in pending.items():
        # A peer we could not reach (its process is gone) will not answer either.
        received = None if peer in unreachable else await wait(receive, deadline)
        if received is None:
            continue
        try:
            statuses[peer] = Status.unpack(bytes(received["s"]), schedule.members)
        except SplitView as exc:
            log.info(
                "all-reduce %s: %s agreed on another membership: %s", links.key, peer[-8:], exc
            )
            if split is not None:
                split.add(peer)
        except (ValueError, GossamerError, msgpack.ExtraData) as exc:
            log.warning("all-reduce %s: bad status from %s: %s", links.key, peer[-8:], exc)
    for status in statuses.values():
        # a proof that does not hold is dropped (it accuses nobody); one that holds is
        # believed from anyone: the signatures speak, not the sender
        status.proofs = [p for p in status.proofs if p.holds(links.key, schedule.attempt)]
    return statuses


async def agree(
    links: Links,
    scope: Scope,
    proposal: Sequence[str],
    deadline: float | None = None,
) -> list[str]:
    """Converge on a membership with the peers we propose to keep (``scope``: the attempt, or
    :data:`~gossamer.training.collective_schedule.JOIN` before the first).

    Every member runs the same two rounds of :class:`MembershipAgreement`, with no early exit:
    in each it sends its current set (a sorted list of peer ids) to the peers in it and
    intersects what it hears back; a peer that does not answer the first round by the deadline
    (``deadline`` if given, else a fresh one) is left out.  Round 2 spreads what round 1
    learned, so a peer that reached only some members before it died is dropped by all of
    them; silence in round 2 drops nobody (see :class:`MembershipAgreement`).  (A member
    that stopped after round 1 because its views agreed would leave the others
    waiting for it in round 2.)  Two faults within one exchange can still split the views; the
    attempt's status exchange then fails and the next attempt agrees again.
    """
    agreement = MembershipAgreement(links.me, list(proposal))
    short = _message_timeout(links)
    # A member's first round may end as late as its own join deadline (it waits that long for
    # a candidate that never answers), and members start their all-reduces up to a join window
    # apart: a later round waits as long as that window, or the member that started last,
    # still in its first round, would be dropped by the others and kept by itself. Plus one
    # message's time: that member's first round ends at *its* join deadline, set a little
    # after ours if it spent longer before the agreement (encoding, a busy event loop) —
    # measured in overlapped rounds, where a member that waited out a candidate we had
    # already left out reached us milliseconds late and each of us kept only itself.
    window = short if deadline is None else max(short, deadline - trio.current_time()) + short
    while not agreement.done:
        round_ = agreement.round
        tag = str(Tag.view(links.key, scope, round_))
        payload = {"m": wire.pack(agreement.proposal)}
        if deadline is None:
            deadline = trio.current_time() + short
        elif round_ > 0:
            deadline = trio.current_time() + window
        pending = {p: links.node.dataplane.post_recv(p, tag) for p in agreement.peers}
        unreachable = await links.send_all(list(pending), tag, payload, deadline)
        views: dict[str, set[str] | None] = {}
        for peer, receive in pending.items():
            received = None if peer in unreachable else await wait(receive, deadline)
            views[peer] = _peer_list(received["m"]) if received is not None else None
        sent = agreement.proposal
        counted = agreement.counted_views(views)
        agreement.on_views(views)
        log.debug(
            "all-reduce %s %s: proposal %s, views %s, unreachable %s",
            links.key,
            tag,
            [p[-8:] for p in sent],
            [sorted(p[-8:] for p in v) for v in counted],
            [p[-8:] for p in unreachable],
        )
    return agreement.proposal


def _message_timeout(links: Links) -> float:
    """How long a small message of the collective (a view, a status) may take: long enough
    to dial a peer we lost the connection to."""
    return 2.0 + links.node.config.dial_timeout / 2


def _peer_list(data: Any) -> set[str] | None:
    try:
        value = wire.unpack(bytes(data))
    except GossamerError:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and len(p) < 128 for p in value):
        return None
    return set(value)
