"""Who is in an all-reduce: each member's status after an attempt, and agreeing on members.

Before the first attempt and after a failed one the members :func:`agree` on who takes part.
After an attempt every member tells every other what it holds (:func:`exchange_statuses`);
:func:`decide` turns the statuses it collected into commit-or-retry and the next membership, the
same on every member that collected the same statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from gossamer.node import wire
from gossamer.node.errors import GossamerError
from gossamer.training.collective_links import Links, wait

log = logging.getLogger("gossamer.training.collective")


@dataclass
class Status:
    """What one member says after an attempt."""

    ok: bool
    missing_parts: list[str] = field(default_factory=list)  # owners whose part never came
    # owner -> contributors summed in every piece of that owner's part this member holds
    contributors: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # contributor -> why (as an owner)

    def pack(self) -> bytes:
        return wire.pack(
            {"ok": self.ok, "m": self.missing_parts, "c": self.contributors, "r": self.refused}
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
        names = [*missing, *contributors, *refused, *(p for v in contributors.values() for p in v)]
        if not all(isinstance(p, str) and p in known for p in names):
            raise ValueError("status names peers outside the attempt")
        return cls(
            raw["ok"],
            missing,
            {k: list(v) for k, v in contributors.items()},
            {k: str(v)[:200] for k, v in refused.items()},
        )


def decide(members: Sequence[str], statuses: dict[str, Status]) -> tuple[bool, list[str]]:
    """(commit?, next membership) from the statuses a member collected, itself included.

    Out: members that went silent, owners some member lacks a part from, and
    contributors an owner refused.  Then, among the parts of owners still in,
    any contributor missing from a part (it was too late for that owner) is
    out too.  Deterministic: members that collected the same statuses decide
    the same.
    """
    full = set(members)
    out = {p for p in members if p not in statuses}
    for status in statuses.values():
        out.update(status.missing_parts)
        out.update(status.refused)
    for status in statuses.values():
        for owner, contributors in status.contributors.items():
            if owner not in out:
                out.update(full - set(contributors))
    commit = not out and all(s.ok for s in statuses.values())
    return commit, sorted(full - out)


async def exchange_statuses(
    links: Links, prefix: str, members: list[str], mine: Status
) -> dict[str, Status]:
    """Send our status to every other member and collect theirs (ours included), by one deadline."""
    statuses = {links.me: mine}
    payload = {"s": mine.pack()}
    timeout = 2.0 + links.node.config.dial_timeout / 2
    deadline = trio.current_time() + timeout
    pending = {
        p: links.node.dataplane.post_recv(p, f"{prefix}st") for p in members if p != links.me
    }
    unreachable = await links.send_all(list(pending), f"{prefix}st", payload, deadline)
    for peer, receive in pending.items():
        # A peer we could not reach (its process is gone) will not answer either.
        received = None if peer in unreachable else await wait(receive, deadline)
        if received is None:
            continue
        try:
            statuses[peer] = Status.unpack(bytes(received["s"]), members)
        except (ValueError, GossamerError, msgpack.ExtraData) as exc:
            log.warning("all-reduce %s: bad status from %s: %s", links.key, peer[-8:], exc)
    return statuses


async def agree(
    links: Links,
    prefix: str,
    members: Sequence[str],
    proposal: Sequence[str],
    deadline: float | None = None,
) -> list[str]:
    """Converge on a membership with the peers we propose to keep.

    Every member runs the same two rounds, with no early exit: in each it
    sends its current set (a sorted list of peer ids) to the peers in it and
    intersects what it hears back; a peer that does not answer by the
    deadline is left out.  Round 2 spreads what round 1 learned, so a peer
    that reached only some members before it died is dropped by all of
    them.  (A member that stopped after round 1 because its views agreed
    would leave the others waiting for it in round 2.)  Two faults within
    one exchange can still split the views; the attempt's status exchange
    then fails and the next attempt agrees again.
    """
    proposal = sorted(set(proposal))
    for round_ in range(2):
        if proposal == [links.me] or links.me not in proposal:
            return proposal
        tag = f"{prefix}mv/{round_}"
        payload = {"m": wire.pack(proposal)}
        if deadline is None or round_ > 0:
            deadline = trio.current_time() + 2.0 + links.node.config.dial_timeout / 2
        pending = {p: links.node.dataplane.post_recv(p, tag) for p in proposal if p != links.me}
        unreachable = await links.send_all(list(pending), tag, payload, deadline)
        views = [set(proposal)]
        for peer, receive in pending.items():
            received = None if peer in unreachable else await wait(receive, deadline)
            view = _peer_list(received["m"]) if received is not None else None
            if view is None or links.me not in view:
                views.append(set(proposal) - {peer})
            else:
                views.append(view)
        agreed = sorted(set.intersection(*views))
        log.debug(
            "all-reduce %s %s: proposal %s, views %s, unreachable %s",
            links.key,
            tag,
            [p[-8:] for p in proposal],
            [sorted(p[-8:] for p in v) for v in views],
            [p[-8:] for p in unreachable],
        )
        proposal = agreed
    return proposal


def _peer_list(data: Any) -> set[str] | None:
    try:
        value = wire.unpack(bytes(data))
    except GossamerError:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and len(p) < 128 for p in value):
        return None
    return set(value)
