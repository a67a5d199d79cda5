"""One attempt's data movement: reduce-scatter, then all-gather, with the codec on the wire.

Who sends which piece to whom under which tag is the attempt's
:class:`~gossamer.training.collective_schedule.AllReduceSchedule`; this module moves the bytes.
Every member sends its encoded piece ``k`` of part ``j`` to part ``j``'s owner
(:meth:`PieceExchange.send_contributions`). The owner decodes and screens each contribution and
reduces a piece as soon as it is complete, then sends the encoded result to every member while
it reduces the next (:meth:`PieceExchange.reduce_my_part`); everybody, the owner included, keeps
the *decoded* bits (:meth:`PieceExchange.receive_part`), so all members end with identical
vectors. :class:`AttemptState` collects what this member holds, for its status.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from gossamer.training import collective_evidence as evidence
from gossamer.training.aggregate import Aggregation, admitted_weights, aggregate
from gossamer.training.codecs import Codec, CodecError, EncodedTensor, get_codec
from gossamer.training.collective_links import Links
from gossamer.training.collective_plan import screen
from gossamer.training.collective_schedule import AllReduceSchedule, Transfer

log = logging.getLogger(__name__)

# a verifier's verdict on one reduced piece (sent with its digest)
VERIFIED, UNVERIFIED, DISPUTED = 0, 1, 2


def _buffers(encoded: EncodedTensor) -> dict[str, Any]:
    return {f"b{i}": buf for i, buf in enumerate(encoded.buffers)}


def _empty_buffers(codec: Codec, numel: int) -> dict[str, torch.Tensor]:
    return {
        f"b{i}": torch.empty(size, dtype=torch.uint8)
        for i, size in enumerate(codec.buffer_sizes(numel))
    }


def _all_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """The owner's piece is the verifier's reduction, up to float rounding (CPUs may order a
    norm's sum differently; a quantised codec may move an element by one step)."""
    if not bool(torch.isfinite(theirs).all()):
        return False
    scale = float(torch.linalg.vector_norm(mine))
    return float(torch.linalg.vector_norm(mine - theirs)) <= 1e-3 * scale + 1e-12


def _piece_digest(values: torch.Tensor, contributors: list[str], total: float) -> bytes:
    """What a reduced piece is to its receivers: its decoded values, mask and total."""
    h = hashlib.sha256(values.contiguous().numpy().tobytes())
    h.update("\0".join(contributors).encode())
    h.update(struct.pack("<d", total))
    return h.digest()


def _decode(codec: Codec, numel: int, received: dict[str, Any]) -> torch.Tensor:
    count = len(codec.buffer_sizes(numel))
    buffers = [received[f"b{i}"] for i in range(count)]
    header = {"codec": codec.name, "shape": [numel], "dtype": "float32"}
    return codec.decode(EncodedTensor.from_header(header, buffers)).reshape(-1)


@dataclass
class AttemptState:
    """What this member holds after an attempt's exchange: the makings of its status."""

    missing_parts: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    contributors_by_owner: dict[str, set[str]] = field(default_factory=dict)
    totals: set[float] = field(default_factory=set)
    # verification: owners whose part this member (as verifier) found wrong, and owners whose
    # bytes differ from what their verifier checked
    disputed: set[str] = field(default_factory=set)
    mismatched: set[str] = field(default_factory=set)
    proofs: list[evidence.Proof] = field(default_factory=list)  # contributors caught two-faced
    # (owner, piece) -> (contributors, total) of reduced pieces in hand, and their arrival
    pieces: dict[tuple[str, int], tuple[list[str], float]] = field(default_factory=dict)
    # (owner, piece) -> the owner's evidence: contributor -> (digest, signature, weight)
    evidence: dict[tuple[str, int], dict[str, tuple[bytes, bytes, float]]] = field(
        default_factory=dict
    )
    _arrived: dict[tuple[str, int], trio.Event] = field(default_factory=dict)

    def arrival(self, owner: str, piece: int) -> trio.Event:
        return self._arrived.setdefault((owner, piece), trio.Event())

    def record(self, owner: str, contributors: list[str], total: float) -> None:
        """A piece of ``owner``'s part, summed over ``contributors``, is in hand."""
        seen = self.contributors_by_owner.get(owner)
        self.contributors_by_owner[owner] = (
            set(contributors) if seen is None else (seen & set(contributors))
        )
        self.totals.add(total)

    @property
    def total_weight(self) -> float:
        return max(self.totals) if self.totals else 0.0


class PieceExchange:
    """Sends and receives the pieces of one all-reduce's attempts over ``links``, in ``codec``."""

    def __init__(self, links: Links, codec: Codec, aggregation: Aggregation | None = None) -> None:
        self.links = links
        self.key = links.key
        self.me = links.me
        self.codec = codec
        self.aggregation = aggregation if aggregation is not None else Aggregation()
        # fp32 on the wire: received bytes are used in place, never decoded into copies
        self._identity = self.codec is get_codec("none")

    def rs_buffers(self, numel: int) -> dict[str, torch.Tensor]:
        buffers = _empty_buffers(self.codec, numel)
        buffers["w"] = torch.empty(1, dtype=torch.float64)
        buffers["s"] = torch.empty(evidence.SIGNATURE_BYTES, dtype=torch.uint8)
        return buffers

    def _encoded_buffers(self, received: Any, numel: int) -> list[torch.Tensor]:
        return [received[f"b{i}"] for i in range(len(self.codec.buffer_sizes(numel)))]

    def _signed(
        self, schedule: AllReduceSchedule, part: int, piece: int, weight: float, buffers: list
    ) -> tuple[bytes, bytes]:
        """(digest, our signature) of a piece we contribute (see collective_evidence)."""
        digest = evidence.digest_of(buffers)
        signature = evidence.sign(
            self.links.node.identity, self.key, schedule.attempt, part, piece, weight, digest
        )
        return digest, signature

    def _check_signed(
        self,
        schedule: AllReduceSchedule,
        peer: str,
        part: int,
        piece: int,
        received: Any,
        numel: int,
    ) -> tuple[bytes, bytes, float]:
        """(digest, signature, weight) of a received contribution; CodecError if the
        signature is not the sender's."""
        weight = float(received["w"][0])
        if not (math.isfinite(weight) and weight > 0):
            raise CodecError(f"weight {weight!r} is not a positive number")
        digest = evidence.digest_of(self._encoded_buffers(received, numel))
        signature = bytes(received["s"].numpy().tobytes())
        if not evidence.verify(
            peer, self.key, schedule.attempt, part, piece, weight, digest, signature
        ):
            raise CodecError("the contribution's signature does not verify")
        return digest, signature, weight

    def ag_buffers(self, numel: int, members: int, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._identity:
            # fp32 on the wire: the reduced piece lands in its final place, no copy
            buffers = {"b0": target.view(torch.uint8)}
        else:
            buffers = _empty_buffers(self.codec, numel)
        buffers["w"] = torch.empty(1, dtype=torch.float64)
        buffers["c"] = torch.empty(members, dtype=torch.uint8)
        buffers["e"] = torch.empty(members * evidence.ENTRY_BYTES, dtype=torch.uint8)
        buffers["ew"] = torch.empty(members, dtype=torch.float64)
        return buffers

    async def send_contributions(
        self,
        schedule: AllReduceSchedule,
        part: int,
        flat: torch.Tensor,
        weight: float,
        deadline: float,
        state: AttemptState,
    ) -> None:
        """Send my pieces of ``part`` to its owner in order, stopping at the first that fails."""
        copies = {t.piece: t for t in schedule.copies_to_verifier(part)}
        transfers = schedule.contributions_to(part) or [
            t for t in copies.values()
        ]  # my own part: only the verifier's copies leave
        for transfer in transfers:
            piece = flat[transfer.start : transfer.end]
            encoded = await trio.to_thread.run_sync(self.codec.encode, piece)
            _, signature = await trio.to_thread.run_sync(
                self._signed, schedule, part, transfer.piece, weight, list(encoded.buffers)
            )
            message = {
                **_buffers(encoded),
                "w": torch.tensor([weight], dtype=torch.float64),
                "s": torch.frombuffer(bytearray(signature), dtype=torch.uint8),
            }
            if not await self.links.send(transfer.receiver, transfer.tag, message, deadline):
                state.unreachable.add(transfer.receiver)
                return
            copy = copies.get(transfer.piece)
            if (
                copy is not None
                and copy is not transfer
                and not await self.links.send(copy.receiver, copy.tag, message, deadline)
            ):
                state.unreachable.add(copy.receiver)
                return

    async def reduce_my_part(
        self,
        schedule: AllReduceSchedule,
        flat: torch.Tensor,
        weight: float,
        rs_pending: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadlines: tuple[float, float],
        state: AttemptState,
    ) -> None:
        deadline, ag_deadline = deadlines
        # The reduced pieces go out in the background, so reducing piece k+1 overlaps sending
        # piece k (the data plane returns from a send only once the peer has verified it).
        async with trio.open_nursery() as senders:
            await self._reduce_pieces(
                schedule,
                flat,
                weight,
                rs_pending,
                out,
                deadline,
                ag_deadline,
                state,
                senders,
            )

    async def _reduce_pieces(
        self,
        schedule: AllReduceSchedule,
        flat: torch.Tensor,
        weight: float,
        rs_pending: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadline: float,
        ag_deadline: float,
        state: AttemptState,
        senders: trio.Nursery,
    ) -> None:
        members = schedule.members
        j = schedule.my_part
        for k, (a, b) in enumerate(schedule.my_pieces):
            own, own_evidence = await trio.to_thread.run_sync(
                self._own_piece, schedule, j, k, flat[a:b], weight
            )
            pieces: dict[str, torch.Tensor] = {self.me: own}
            weights: dict[str, float] = {self.me: weight}
            signed: dict[str, tuple[bytes, bytes, float]] = {self.me: own_evidence}
            for peer in schedule.others:
                received = await self.links.wait_from(peer, rs_pending[(peer, k)], deadline)
                if received is None:
                    continue
                try:
                    signed[peer] = await trio.to_thread.run_sync(
                        self._check_signed, schedule, peer, j, k, received, b - a
                    )
                    weights[peer] = signed[peer][2]
                    pieces[peer] = self._decoded(received, b - a)
                except (CodecError, KeyError, ValueError) as exc:
                    log.warning(
                        "all-reduce %s: refusing %s's contribution to piece %d/%d: %s",
                        self.key,
                        peer[-8:],
                        j,
                        k,
                        exc,
                    )
                    state.refused[peer] = f"undecodable contribution: {exc}"
            # what each contributor is believed to weigh (a claim of 10^15 tokens is not)
            admitted = admitted_weights({p: weights[p] for p in pieces}, self.aggregation)
            direction = self.aggregation.rule != "mean" and self.aggregation.direction_screen
            refusals = screen(pieces, weights=admitted, direction=direction)
            bound = self.aggregation.max_weight
            if bound is not None:
                # the recipe's bound on one round is exact: an honest member never claims more
                for peer in pieces:
                    if weights[peer] > bound * (1 + 1e-9):
                        refusals[peer] = f"claims {weights[peer]:.4g} tokens; a round has {bound:g}"
            for peer, why in refusals.items():
                log.warning(
                    "all-reduce %s: refusing %s's contribution to piece %d/%d: %s",
                    self.key,
                    peer[-8:],
                    j,
                    k,
                    why,
                )
                state.refused[peer] = why
                pieces.pop(peer, None)
            if not pieces:  # nothing sane to reduce
                state.missing_parts.add(self.me)
                return
            # If our own values were refused we still reduce the others' for our
            # part: the statuses then drop only us, without anyone waiting.
            contributors = sorted(pieces)
            # the weights of the contributors summed, as a verifier recomputes them
            final = admitted_weights({p: weights[p] for p in contributors}, self.aggregation)
            encoded, total = await trio.to_thread.run_sync(
                self._reduce_into, {p: (pieces[p], final[p]) for p in contributors}, out, a, b
            )
            state.record(self.me, contributors, total)
            mask = torch.tensor([p in pieces for p in members], dtype=torch.uint8)
            entries, entry_weights = evidence.pack_evidence(
                members, {p: signed[p] for p in contributors}
            )
            message = {
                **_buffers(encoded),
                "w": torch.tensor([total], dtype=torch.float64),
                "c": mask,
                "e": entries,
                "ew": entry_weights,
            }
            for transfer in schedule.reduced_out(k):
                senders.start_soon(
                    self.links.send, transfer.receiver, transfer.tag, message, ag_deadline
                )

    def _own_piece(
        self,
        schedule: AllReduceSchedule,
        part: int,
        piece: int,
        values: torch.Tensor,
        weight: float,
    ) -> tuple[torch.Tensor, tuple[bytes, bytes, float]]:
        """Our contribution to ``part`` as receivers decode it, and its signed digest."""
        encoded = self.codec.encode(values)
        digest, signature = self._signed(schedule, part, piece, weight, list(encoded.buffers))
        decoded = values if self._identity else self.codec.decode(encoded).reshape(-1)
        return decoded, (digest, signature, weight)

    def _reduce_into(
        self,
        contributions: dict[str, tuple[torch.Tensor, float]],
        out: torch.Tensor,
        a: int,
        b: int,
    ) -> tuple[EncodedTensor, float]:
        """Reduce one piece, encode it for the all-gather and keep its decoded bits in ``out``."""
        reduced, total = aggregate(contributions, self.aggregation)
        if self._identity:
            out[a:b] = reduced
            return self.codec.encode(out[a:b]), total
        encoded = self.codec.encode(reduced)
        out[a:b] = self.codec.decode(encoded).reshape(-1)
        return encoded, total

    async def receive_part(
        self,
        schedule: AllReduceSchedule,
        transfer: Transfer,
        pending: Any,
        out: torch.Tensor,
        deadline: float,
        state: AttemptState,
    ) -> None:
        """Take in the reduced piece ``transfer`` describes (``pending`` is its posted receive)."""
        a, b = transfer.start, transfer.end
        owner = transfer.sender
        received = await self.links.wait_from(owner, pending, deadline)
        if received is None:
            state.missing_parts.add(owner)
            return
        try:
            if self._identity:
                if not await trio.to_thread.run_sync(_all_finite, out[a:b]):
                    raise CodecError("received non-finite values")
            else:
                out[a:b] = await trio.to_thread.run_sync(
                    _decode, self.codec, b - a, received.tensors
                )
            mask = received["c"]
            bits = mask.tolist()
            contributors = [p for p, bit in zip(schedule.members, bits, strict=True) if bit]
            total = float(received["w"][0])
        except (CodecError, KeyError, ValueError) as exc:
            log.warning(
                "all-reduce %s: part %d from %s is malformed: %s",
                self.key,
                transfer.part,
                owner[-8:],
                exc,
            )
            state.missing_parts.add(owner)
            return
        try:
            state.evidence[(owner, transfer.piece)] = evidence.unpack_evidence(
                schedule.members, received["e"], received["ew"]
            )
        except (KeyError, ValueError):
            state.evidence[(owner, transfer.piece)] = {}  # a verifier will dispute it
        state.record(owner, contributors, total)
        state.pieces[(owner, transfer.piece)] = (contributors, total)
        state.arrival(owner, transfer.piece).set()

    # ------------------------------------------------------------ verification

    def _decoded(self, received: Any, numel: int) -> torch.Tensor:
        """A received contribution's values (in place for fp32 on the wire)."""
        if self._identity:
            return received["b0"].view(torch.float32)
        return _decode(self.codec, numel, received.tensors)

    async def verify_part(
        self,
        schedule: AllReduceSchedule,
        part: int,
        flat: torch.Tensor,
        weight: float,
        copies: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadlines: tuple[float, float],
        state: AttemptState,
    ) -> None:
        """As ``part``'s verifier: reduce every piece again from the copies of its
        contributions, over the contributors the owner says it summed, and compare with what the
        owner sent; tell the others the verdict (and a digest of the checked bytes), so nobody
        waits for a verdict that will not come."""
        deadline, ag_deadline = deadlines
        owner = schedule.owner(part)
        disputed = False
        for k, (a, b) in enumerate(schedule.plan.pieces(part)):
            verdict, digest = UNVERIFIED, bytes(32)
            if not disputed:
                verdict, digest = await self._verify_piece(
                    schedule, part, k, (a, b), flat, weight, copies, out, deadline, ag_deadline,
                    state,
                )  # fmt: skip
                disputed = verdict == DISPUTED
            message = {
                "h": torch.frombuffer(bytearray(digest), dtype=torch.uint8),
                "v": torch.tensor([verdict], dtype=torch.uint8),
            }
            async with trio.open_nursery() as nursery:
                for t in schedule.digests_out(part, k):
                    nursery.start_soon(self.links.send, t.receiver, t.tag, message, ag_deadline)
        if disputed:
            state.disputed.add(owner)

    async def _verify_piece(
        self,
        schedule: AllReduceSchedule,
        part: int,
        k: int,
        span: tuple[int, int],
        flat: torch.Tensor,
        weight: float,
        copies: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadline: float,
        ag_deadline: float,
        state: AttemptState,
    ) -> tuple[int, bytes]:
        a, b = span
        owner = schedule.owner(part)
        held: dict[str, tuple[torch.Tensor, float]] = {}
        signed: dict[str, tuple[bytes, bytes, float]] = {}
        held_own, signed[self.me] = await trio.to_thread.run_sync(
            self._own_piece, schedule, part, k, flat[a:b], weight
        )
        held[self.me] = (held_own, weight)
        for peer in schedule.others:
            # the owner's own copy may come as late as its part: it sends both at once, and
            # late is not lying; only an owner that never sends its copy is suspect
            until = ag_deadline if peer == owner else deadline
            received = await self.links.wait_from(peer, copies[(peer, k)], until)
            if received is None:
                continue
            with contextlib.suppress(CodecError, KeyError, ValueError):
                signed[peer] = await trio.to_thread.run_sync(
                    self._check_signed, schedule, peer, part, k, received, b - a
                )
                values = await trio.to_thread.run_sync(self._decoded, received, b - a)
                held[peer] = (values, signed[peer][2])
        with trio.move_on_at(ag_deadline):
            await state.arrival(owner, k).wait()
        if (owner, k) not in state.pieces:
            return UNVERIFIED, bytes(32)  # the owner's piece never came: the statuses say so
        contributors, total = state.pieces[(owner, k)]
        if owner not in held:
            # the owner kept its own contribution from us all the attempt: only it is at fault
            log.warning(
                "all-reduce %s: %s sent us no copy of its own piece %d/%d: disputed",
                self.key,
                owner[-8:],
                part,
                k,
            )
            return DISPUTED, bytes(32)
        shown = state.evidence.get((owner, k), {})
        for p in contributors:
            entry = shown.get(p)
            if entry is None or not evidence.verify(
                p, self.key, schedule.attempt, part, k, entry[2], entry[0], entry[1]
            ):
                log.warning(
                    "all-reduce %s: %s summed a piece %s did not sign (part %d piece %d)",
                    self.key,
                    owner[-8:],
                    p[-8:],
                    part,
                    k,
                )
                return DISPUTED, bytes(32)
            ours = signed.get(p)
            if ours is not None and (ours[2], ours[0]) != (entry[2], entry[0]):
                # p signed one piece for the owner and another for us: a proof, not a word
                log.warning(
                    "all-reduce %s: %s signed two different contributions to part %d piece %d",
                    self.key,
                    p[-8:],
                    part,
                    k,
                )
                state.proofs.append(
                    evidence.Proof(
                        p, part, k, (entry[2], entry[0], entry[1]), (ours[2], ours[0], ours[1])
                    )
                )
                return UNVERIFIED, bytes(32)
        if any(p not in held for p in contributors):
            # a third member's copy is missing: cannot check
            return UNVERIFIED, bytes(32)
        admitted = admitted_weights({p: held[p][1] for p in contributors}, self.aggregation)
        mine = await trio.to_thread.run_sync(
            self._recompute, {p: (held[p][0], admitted[p]) for p in contributors}
        )
        theirs = out[a:b]
        if not await trio.to_thread.run_sync(_close, mine, theirs):
            log.warning(
                "all-reduce %s: %s's part %d piece %d differs from our reduction: disputed",
                self.key,
                owner[-8:],
                part,
                k,
            )
            return DISPUTED, bytes(32)
        return VERIFIED, await trio.to_thread.run_sync(_piece_digest, theirs, contributors, total)

    def _recompute(self, contributions: dict[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
        reduced, _ = aggregate(contributions, self.aggregation)
        if self._identity:
            return reduced
        return self.codec.decode(self.codec.encode(reduced)).reshape(-1)

    async def check_digest(
        self,
        owner: str,
        transfer: Transfer,
        pending: Any,
        out: torch.Tensor,
        deadline: float,
        state: AttemptState,
    ) -> None:
        """Compare what ``owner`` sent us with its verifier's digest (when one comes)."""
        received = await self.links.wait_from(transfer.sender, pending, deadline)
        if received is None:
            return  # no word from the verifier: the piece stands unverified
        with trio.move_on_at(deadline):
            await state.arrival(owner, transfer.piece).wait()
        held = state.pieces.get((owner, transfer.piece))
        if held is None:
            return
        try:
            theirs = bytes(received["h"].numpy().tobytes())
            verdict = int(received["v"][0])
        except (KeyError, AttributeError, ValueError, IndexError):
            return
        if verdict != VERIFIED:
            return  # unverified (the verifier's own dispute, if any, is in its status)
        mine = await trio.to_thread.run_sync(
            _piece_digest, out[transfer.start : transfer.end], held[0], held[1]
        )
        if mine != theirs:
            log.warning(
                "all-reduce %s: %s's part %d piece %d is not what its verifier checked",
                self.key,
                owner[-8:],
                transfer.part,
                transfer.piece,
            )
            state.mismatched.add(owner)
