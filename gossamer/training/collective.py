"""All-reduce over the tensor data plane: direct reduce-scatter + all-gather, fault tolerant.

The flat fp32 vector is cut into one contiguous part per member (block-aligned
so blockwise codecs quantise identically everywhere) and each part into pieces
of a few MB.  Attempt ``a`` with members ``M`` (sorted peer ids):

1. reduce-scatter: every member sends its encoded piece ``k`` of part ``j`` to
   part ``j``'s owner; the owner decodes every contribution, screens it (finite,
   sanely scaled), and sums them tokens-weighted in fp32, in peer-id order, as
   soon as a piece is complete — summation overlaps the transfer of later pieces;
2. all-gather: the owner encodes its reduced piece once and sends it to every
   member; everybody, the owner included, uses the *decoded* bytes, so all
   members end with bit-identical vectors;
3. status: every member tells every other whether it holds every part and
   which contributors were summed; the attempt commits only when all members
   report success with the full membership;
4. otherwise members agree on who is out (whoever went silent, whoever a
   member lacked a part from, whoever an owner refused) and run attempt
   ``a+1`` without them, after dropping the old attempt's messages.

Each member sends 2·(n−1)/n of the (encoded) vector per attempt, as a ring
all-reduce would, but in two steps instead of 2·(n−1) and with all links busy
at once.  The parity check after the outer step (see :mod:`gossamer.training.diloco`)
catches anything that slips through; a member that diverges re-fetches state.

Here: the attempts and their retries. The parts: :mod:`~gossamer.training.collective_plan` (how
the vector is cut, summed and screened), :mod:`~gossamer.training.collective_schedule` (who
sends which piece to whom, under which tag), :mod:`~gossamer.training.collective_exchange` (steps
1 and 2), :mod:`~gossamer.training.collective_membership` (steps 3 and 4, and agreeing on the
members before the first attempt) and :mod:`~gossamer.training.collective_links` (a deadline on
every message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from gossamer.node import BULK_BYTES, DeadlinePolicy, GossamerError
from gossamer.training.aggregate import Aggregation
from gossamer.training.codecs import Codec, ErrorFeedback, get_codec
from gossamer.training.collective_exchange import AttemptState, PieceExchange
from gossamer.training.collective_links import Links
from gossamer.training.collective_membership import (
    MAX_PROOFS,
    Status,
    agree,
    decide,
    exchange_statuses,
)
from gossamer.training.collective_plan import DEFAULT_PIECE_ELEMS, Plan
from gossamer.training.collective_schedule import JOIN, PROBE, AllReduceSchedule, scope_prefix

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
# One bulk transfer to each member whose link we have not measured (a fresh member, round 0):
# large enough that its time is mostly bytes on links up to a few hundred Mbit/s.
PROBE_BYTES = 1 << 20


class CollectiveError(GossamerError):
    """The all-reduce could not complete with anyone."""


@dataclass
class AllReduceResult:
    tensor: torch.Tensor  # the tokens-weighted mean, flat fp32
    members: tuple[str, ...]  # whose contributions it holds
    total_weight: float
    attempts: int
    bytes_sent: int
    seconds: float
    refused: dict[str, str] = field(default_factory=dict)
    # (owner, contributor) pairs where only that owner left the contributor out
    lone_exclusions: tuple[tuple[str, str], ...] = ()


class AllReduce:
    """One all-reduce of a flat fp32 vector among ``members`` (this node included)."""

    def __init__(
        self,
        node: Any,
        key: str,
        members: Sequence[str],
        *,
        codec: str | Codec = "none",
        piece_elems: int = DEFAULT_PIECE_ELEMS,
        phase_timeout: float | None = None,
        error_feedback: ErrorFeedback | None = None,
        join_deadline: float | None = None,
        on_attempt: Callable[[int, list[str]], Awaitable[None]] | None = None,
        aggregation: Aggregation | None = None,
        verify: bool = True,
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self.node = node
        # a first attempt opens channels: never less than a dial
        self.deadlines = deadlines or DeadlinePolicy(floor=node.config.dial_timeout)
        self.verify = verify
        self.key = key
        self.me = node.peer_id
        if self.me not in members:
            raise ValueError("the local node must be one of the members")
        self.members = tuple(sorted(set(members)))
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.links = Links(node, key)
        self.exchange = PieceExchange(self.links, self.codec, aggregation)
        self.piece_elems = piece_elems
        self.phase_timeout = phase_timeout
        self.error_feedback = error_feedback
        self.join_deadline = join_deadline
        self.on_attempt = on_attempt
        # owner/verifier disagreements of this all-reduce's attempts: member -> whom it
        # disagreed with (two different members put it out, see collective_membership.decide)
        self.dispute_partners: dict[str, set[str]] = {}
        self.split_forgiven: set[str] = set()  # peers whose split view we overlooked once
        self.lone_exclusions: tuple[tuple[str, str], ...] = ()

    @property
    def bytes_sent(self) -> int:
        return self.links.bytes_sent

    async def run(self, flat: torch.Tensor, weight: float) -> AllReduceResult:
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("all_reduce takes a flat, contiguous fp32 tensor")
        if not weight > 0:
            raise ValueError("the contribution weight (tokens) must be positive")
        start = time.perf_counter()
        # The error-feedback residual is applied once, whatever attempt commits.
        if self.error_feedback is not None:
            # One residual per vector, carried across rounds (keys change every round).
            encoded = self.error_feedback.encode("flat", flat)
            flat = self.codec.decode(encoded).reshape(-1)
        # Candidates come from each member's own view of the run; agree first.
        members = await agree(self.links, JOIN, self.members, self.join_deadline)
        self.node.dataplane.drop(scope_prefix(self.key, JOIN))
        try:
            await self._probe(members, self._bytes_per_peer(flat, members))
            return await self._attempts(members, flat, weight, start)
        finally:
            self.node.dataplane.drop(scope_prefix(self.key, PROBE))

    async def _probe(self, members: list[str], per_peer: int) -> None:
        """Measure the links to members no transfer has measured yet (their deadline would
        otherwise be the ceiling): one bulk send each, all at once like a reduce-scatter's,
        as large as a phase sends each member (at most PROBE_BYTES).  A phase too small to be a
        bulk transfer needs no rate: its deadline is the floor.  The receiver only acknowledges
        the probe (an unclaimed arrival, dropped afterwards)."""
        if per_peer < BULK_BYTES:
            return
        links = self.node.dataplane.links
        unmeasured = [
            p
            for p in members
            if p != self.me and (links.get(p) is None or links.get(p).seconds_per_byte is None)
        ]
        if not unmeasured:
            return
        payload = {"x": torch.zeros(min(PROBE_BYTES, per_peer), dtype=torch.uint8)}
        deadline = trio.current_time() + self.deadlines.floor
        tag = scope_prefix(self.key, PROBE) + self.me[-16:]
        failed = await self.links.send_all(unmeasured, tag, payload, deadline)
        if failed:
            log.info(
                "all-reduce %s: could not measure the link to %s",
                self.key,
                ", ".join(p[-8:] for p in sorted(failed)),
            )

    async def _attempts(
        self, members: list[str], flat: torch.Tensor, weight: float, start: float
    ) -> AllReduceResult:
        refused_all: dict[str, str] = {}
        for attempt in range(MAX_ATTEMPTS):
            if members == [self.me]:
                return AllReduceResult(
                    flat.clone(),
                    (self.me,),
                    weight,
                    attempt + 1,
                    self.bytes_sent,
                    time.perf_counter() - start,
                    refused_all,
                )
            if self.on_attempt is not None:
                await self.on_attempt(attempt, list(members))
            try:
                outcome = await self._attempt(attempt, members, flat, weight)
            finally:
                self.node.dataplane.drop(scope_prefix(self.key, attempt))
            commit, next_members, result, total, refused = outcome
            refused_all.update(refused)
            if commit:
                return AllReduceResult(
                    result,
                    tuple(members),
                    total,
                    attempt + 1,
                    self.bytes_sent,
                    time.perf_counter() - start,
                    refused_all,
                    self.lone_exclusions,
                )
            if self.me not in next_members:
                raise CollectiveError(f"all-reduce {self.key}: the others dropped this member")
            log.warning(
                "all-reduce %s attempt %d failed; retrying with %d of %d members (out: %s)",
                self.key,
                attempt,
                len(next_members),
                len(members),
                ", ".join(p[-8:] for p in sorted(set(members) - set(next_members))),
            )
            members = next_members
        raise CollectiveError(f"all-reduce {self.key} did not commit in {MAX_ATTEMPTS} attempts")

    def _bytes_per_peer(self, flat: torch.Tensor, members: list[str]) -> int:
        """What we send each member in one phase, encoded: our contribution to its part, and a
        second copy for the part it verifies when parts are verified."""
        volume = 2.0 if self.verify and len(members) >= 3 else 1.0
        sample = flat[: min(flat.numel(), 1 << 16)]
        per_elem = self.codec.encode(sample).nbytes / max(1, sample.numel())
        return int(volume * per_elem * flat.numel() / max(1, len(members)))

    def _timeout(self, flat: torch.Tensor, members: list[str]) -> float:
        """One phase's deadline: what the measured links to the members need for the bytes we
        send each of them in a phase (our contribution to its part, a second copy for its
        verifier when parts are verified), times the policy's safety, within its bounds."""
        if self.phase_timeout is not None:
            return self.phase_timeout
        per_peer = self._bytes_per_peer(flat, members)
        links = self.node.dataplane.links
        if per_peer < BULK_BYTES:
            # a small message's time is its round trip; the floor covers an unmeasured one
            rtts = [links.rtt(p) for p in members if p != self.me]
            return self.deadlines.deadline(max((r for r in rtts if r is not None), default=0.0))
        return self.deadlines.worst(
            [links.seconds_for(p, per_peer) for p in members if p != self.me]
        )

    async def _attempt(
        self, attempt: int, members: list[str], flat: torch.Tensor, weight: float
    ) -> tuple[bool, list[str], torch.Tensor, float, dict[str, str]]:
        plan = Plan(tuple(members), flat.numel(), self.piece_elems)
        schedule = AllReduceSchedule(self.key, attempt, plan, self.me, self.verify)
        timeout = self._timeout(flat, members)
        # Contributions are due by ``deadline``; reduced parts by ``ag_deadline``, a
        # whole timeout later, so an owner that waited out a dead member's
        # contribution still has time to send its part.
        deadline = trio.current_time() + timeout
        ag_deadline = deadline + timeout
        out = torch.empty_like(flat)
        state = AttemptState()
        dataplane = self.node.dataplane
        # Post every receive first, so bytes land straight in preallocated memory.
        rs_pending = {
            (t.sender, t.piece): dataplane.post_recv(
                t.sender, t.tag, into=self.exchange.rs_buffers(t.numel)
            )
            for t in schedule.contributions_in()
        }
        # verification: copies of the contributions to the parts we verify, and the
        # verifiers' digests of the parts we only receive
        copies = {
            j: {
                (t.sender, t.piece): dataplane.post_recv(
                    t.sender, t.tag, into=self.exchange.rs_buffers(t.numel)
                )
                for t in schedule.copies_in(j)
            }
            for j in schedule.verified_parts
        }
        digests = {t: dataplane.post_recv(t.sender, t.tag) for t in schedule.digests_in()}
        ag_pending = {
            t: dataplane.post_recv(
                t.sender,
                t.tag,
                into=self.exchange.ag_buffers(t.numel, len(members), out[t.start : t.end]),
            )
            for t in schedule.parts_in()
        }
        async with trio.open_nursery() as nursery:
            for part in range(len(members)):
                if part != schedule.my_part or schedule.copies_to_verifier(part):
                    # our own part's copy (for its verifier) may take the whole attempt: its
                    # verifier waits that long for it before it calls us a liar
                    nursery.start_soon(
                        self.exchange.send_contributions,
                        schedule,
                        part,
                        flat,
                        weight,
                        deadline if part != schedule.my_part else ag_deadline,
                        state,
                    )
            nursery.start_soon(
                self.exchange.reduce_my_part,
                schedule,
                flat,
                weight,
                rs_pending,
                out,
                (deadline, ag_deadline),
                state,
            )
            for transfer, pending in ag_pending.items():
                nursery.start_soon(
                    self.exchange.receive_part, schedule, transfer, pending, out, ag_deadline, state
                )
            for part, pending_copies in copies.items():
                nursery.start_soon(
                    self.exchange.verify_part,
                    schedule,
                    part,
                    flat,
                    weight,
                    pending_copies,
                    out,
                    (deadline, ag_deadline),
                    state,
                )
            for transfer, pending in digests.items():
                nursery.start_soon(
                    self.exchange.check_digest,
                    schedule.owner(transfer.part),
                    transfer,
                    pending,
                    out,
                    ag_deadline,
                    state,
                )
        mine = Status(
            ok=not state.missing_parts,
            missing_parts=sorted(state.missing_parts),
            contributors={o: sorted(c) for o, c in state.contributors_by_owner.items()},
            refused=state.refused,
            disputed=sorted(state.disputed),
            mismatched=sorted(state.mismatched),
            proofs=state.proofs[:MAX_PROOFS],
        )
        split: set[str] = set()
        statuses = await exchange_statuses(self.links, schedule, mine, ag_deadline, split)
        commit, proposal, disputes, lone = decide(
            members, statuses, schedule.verifier_of, self.dispute_partners
        )
        # A peer whose agreement ended on another membership (a member died between the
        # agreement's rounds) is no liar: keep it for the next agreement, which both of us
        # then run from the same candidates. Once per peer and all-reduce, so a member that
        # keeps claiming other memberships cannot keep the round from committing.
        forgiven = {p for p in split if p not in self.split_forgiven}
        self.split_forgiven |= forgiven
        if forgiven and not commit:
            proposal = sorted(set(proposal) | forgiven)
        self.lone_exclusions = lone
        for a, b in disputes:
            self.dispute_partners.setdefault(a, set()).add(b)
            self.dispute_partners.setdefault(b, set()).add(a)
        if disputes:
            log.warning(
                "all-reduce %s %s: disputed parts %s",
                self.key,
                schedule.prefix,
                [(a[-8:], b[-8:]) for a, b in disputes],
            )
        if not commit:
            log.info(
                "all-reduce %s %s: statuses %s",
                self.key,
                schedule.prefix,
                {
                    p[-8:]: (
                        st.ok,
                        [m[-8:] for m in st.missing_parts],
                        {o[-8:]: len(c) for o, c in st.contributors.items()},
                        [r[-8:] for r in st.refused],
                    )
                    for p, st in statuses.items()
                },
            )
        if commit:
            return True, members, out, state.total_weight, state.refused
        agreed = await agree(self.links, attempt, proposal)
        return False, agreed, out, 0.0, state.refused


async def all_reduce(
    node: Any,
    key: str,
    members: Sequence[str],
    flat: torch.Tensor,
    weight: float,
    *,
    codec: str | Codec = "none",
    piece_elems: int = DEFAULT_PIECE_ELEMS,
    phase_timeout: float | None = None,
    error_feedback: ErrorFeedback | None = None,
    join_deadline: float | None = None,
    on_attempt: Callable[[int, list[str]], Awaitable[None]] | None = None,
    aggregation: Aggregation | None = None,
    verify: bool = True,
    deadlines: DeadlinePolicy | None = None,
) -> AllReduceResult:
    """Tokens-weighted mean of ``flat`` across ``members``; see the module docstring.

    ``aggregation``: how each part's owner believes weights and reduces (default: bounded
    weights, the plain weighted mean; see :mod:`gossamer.training.aggregate`). ``verify``:
    every part also reduced by a verifier (from three members on; twice the reduce-scatter
    bytes), so that a lying owner is caught.

    ``members`` is this node's view of who takes part; the members first agree
    on a common list (waiting for slower ones until ``join_deadline``, a
    ``trio.current_time()`` value), so views that differ slightly still work.
    """
    collective = AllReduce(
        node,
        key,
        members,
        codec=codec,
        piece_elems=piece_elems,
        phase_timeout=phase_timeout,
        error_feedback=error_feedback,
        join_deadline=join_deadline,
        on_attempt=on_attempt,
        aggregation=aggregation,
        verify=verify,
        deadlines=deadlines,
    )
    return await collective.run(flat, weight)
