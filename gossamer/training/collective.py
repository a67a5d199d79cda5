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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import trio

from gossamer.node import wire
from gossamer.node.errors import GossamerError
from gossamer.training.codecs import Codec, CodecError, EncodedTensor, ErrorFeedback, get_codec

log = logging.getLogger("gossamer.training.collective")

BLOCK = 256  # the blockwise codecs' block: parts and pieces start on a block boundary
DEFAULT_PIECE_ELEMS = 2 << 20  # 8 MiB of fp32 per piece
MAX_ATTEMPTS = 4
SCALE_LIMIT = 100.0  # a contribution this many times the median norm of the others is refused


class CollectiveError(GossamerError):
    """The all-reduce could not complete with anyone."""


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Plan:
    """Who owns which range of the flat vector, and how ranges are cut into pieces."""

    members: tuple[str, ...]
    numel: int
    piece_elems: int = DEFAULT_PIECE_ELEMS

    def __post_init__(self) -> None:
        if list(self.members) != sorted(set(self.members)):
            raise ValueError("plan members must be sorted and unique")
        if self.piece_elems % BLOCK:
            raise ValueError(f"piece size must be a multiple of {BLOCK}")

    def part(self, index: int) -> tuple[int, int]:
        blocks = math.ceil(self.numel / BLOCK)
        per = math.ceil(blocks / len(self.members)) * BLOCK
        return min(index * per, self.numel), min((index + 1) * per, self.numel)

    def pieces(self, index: int) -> list[tuple[int, int]]:
        start, end = self.part(index)
        return [(a, min(a + self.piece_elems, end)) for a in range(start, end, self.piece_elems)]


def reduce_piece(
    contributions: dict[str, tuple[torch.Tensor, float]],
) -> tuple[torch.Tensor, float]:
    """Tokens-weighted mean of fp32 tensors, summed in peer-id order (bit-deterministic)."""
    if not contributions:
        raise ValueError("nothing to reduce")
    peers = sorted(contributions)
    total = math.fsum(contributions[p][1] for p in peers)
    if total <= 0:
        raise ValueError("contribution weights must sum to a positive number")
    # The same arithmetic as outer.weighted_average, so a network all-reduce (codec none)
    # gives the single-process reference's bits: fp32 weights w/total, then one multiply and
    # one add per contributor, each rounded (no fused ``add_(alpha=...)``, which some CPUs
    # compute with an FMA and others without).
    acc: torch.Tensor | None = None
    for peer in peers:
        tensor, weight = contributions[peer]
        term = tensor * torch.tensor(weight / total, dtype=torch.float32)
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return acc, total


def screen(pieces: dict[str, torch.Tensor], limit: float = SCALE_LIMIT) -> dict[str, str]:
    """Contributors to refuse, with the reason: non-finite values, or a norm far off the others'.

    With three or more contributors, one whose norm exceeds ``limit`` × the
    median norm of the others is refused; with two, only non-finite values are
    (there is no majority to say which one is off).
    """
    refused: dict[str, str] = {}
    norms: dict[str, float] = {}
    for peer, tensor in pieces.items():
        norm = float(torch.linalg.vector_norm(tensor)) if tensor.numel() else 0.0
        if not math.isfinite(norm):
            refused[peer] = "contains NaN or Inf"
        else:
            norms[peer] = norm
    if len(norms) >= 3:
        for peer, norm in norms.items():
            others = sorted(v for p, v in norms.items() if p != peer)
            median = others[len(others) // 2]
            if norm > limit * max(median, 1e-12) and norm > 1e-6:
                refused[peer] = f"norm {norm:.3g} is {norm / max(median, 1e-12):.3g}× the median"
    return refused


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


# ------------------------------------------------------------------------- the protocol


@dataclass
class AllReduceResult:
    tensor: torch.Tensor  # the tokens-weighted mean, flat fp32
    members: tuple[str, ...]  # whose contributions it holds
    total_weight: float
    attempts: int
    bytes_sent: int
    seconds: float
    refused: dict[str, str] = field(default_factory=dict)


def _buffers(encoded: EncodedTensor) -> dict[str, Any]:
    return {f"b{i}": buf for i, buf in enumerate(encoded.buffers)}


def _empty_buffers(codec: Codec, numel: int) -> dict[str, torch.Tensor]:
    return {
        f"b{i}": torch.empty(size, dtype=torch.uint8)
        for i, size in enumerate(codec.buffer_sizes(numel))
    }


def _all_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _decode(codec: Codec, numel: int, received: dict[str, Any]) -> torch.Tensor:
    count = len(codec.buffer_sizes(numel))
    buffers = [received[f"b{i}"] for i in range(count)]
    header = {"codec": codec.name, "shape": [numel], "dtype": "float32"}
    return codec.decode(EncodedTensor.from_header(header, buffers)).reshape(-1)


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
    ) -> None:
        self.node = node
        self.key = key
        self.me = node.peer_id
        if self.me not in members:
            raise ValueError("the local node must be one of the members")
        self.members = tuple(sorted(set(members)))
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        # fp32 on the wire: received bytes are used in place, never decoded into copies
        self._identity = self.codec is get_codec("none")
        self.piece_elems = piece_elems
        self.phase_timeout = phase_timeout
        self.error_feedback = error_feedback
        self.join_deadline = join_deadline
        self.on_attempt = on_attempt
        self.bytes_sent = 0

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
        members = await self._agree(
            f"ar/{self.key}/join/", self.members, self.members, self.join_deadline
        )
        self.node.dataplane.drop(f"ar/{self.key}/join/")
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
            prefix = f"ar/{self.key}/{attempt}/"
            if self.on_attempt is not None:
                await self.on_attempt(attempt, list(members))
            try:
                outcome = await self._attempt(prefix, members, flat, weight)
            finally:
                self.node.dataplane.drop(prefix)
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

    def _timeout(self, numel: int, members: int) -> float:
        if self.phase_timeout is not None:
            return self.phase_timeout
        # generous: 5 s plus the vector at 20 MB/s per member; measured rates are 10-100× that
        return 5.0 + numel * 4 * members / 20e6

    async def _attempt(
        self, prefix: str, members: list[str], flat: torch.Tensor, weight: float
    ) -> tuple[bool, list[str], torch.Tensor, float, dict[str, str]]:
        plan = Plan(tuple(members), flat.numel(), self.piece_elems)
        me_index = members.index(self.me)
        timeout = self._timeout(flat.numel(), len(members))
        # Contributions are due by ``deadline``; reduced parts by ``ag_deadline``, a
        # whole timeout later, so an owner that waited out a dead member's
        # contribution still has time to send its part.
        deadline = trio.current_time() + timeout
        ag_deadline = deadline + timeout
        out = torch.empty_like(flat)
        state = _AttemptState()
        dataplane = self.node.dataplane
        # Post every receive first, so bytes land straight in preallocated memory.
        rs_pending = {
            (peer, k): dataplane.post_recv(
                peer, f"{prefix}rs/{me_index}/{k}", into=self._rs_buffers(b - a)
            )
            for k, (a, b) in enumerate(plan.pieces(me_index))
            for peer in members
            if peer != self.me
        }
        ag_pending = {
            (j, k): dataplane.post_recv(
                members[j],
                f"{prefix}ag/{j}/{k}",
                into=self._ag_buffers(b - a, len(members), out[a:b]),
            )
            for j in range(len(members))
            if j != me_index
            for k, (a, b) in enumerate(plan.pieces(j))
        }
        async with trio.open_nursery() as nursery:
            for j, owner in enumerate(members):
                if owner != self.me:
                    nursery.start_soon(
                        self._send_contributions,
                        prefix,
                        plan,
                        j,
                        owner,
                        flat,
                        weight,
                        deadline,
                        state,
                    )
            nursery.start_soon(
                self._reduce_my_part,
                prefix,
                plan,
                me_index,
                flat,
                weight,
                rs_pending,
                out,
                (deadline, ag_deadline),
                state,
            )
            for (j, k), pending in ag_pending.items():
                nursery.start_soon(self._receive_part, plan, j, k, pending, out, ag_deadline, state)
        mine = Status(
            ok=not state.missing_parts,
            missing_parts=sorted(state.missing_parts),
            contributors={o: sorted(c) for o, c in state.contributors_by_owner.items()},
            refused=state.refused,
        )
        statuses = await self._exchange_statuses(prefix, members, mine)
        commit, proposal = decide(members, statuses)
        if not commit:
            log.info(
                "all-reduce %s %s: statuses %s",
                self.key,
                prefix,
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
        agreed = await self._agree(prefix, members, proposal)
        return False, agreed, out, 0.0, state.refused

    def _rs_buffers(self, numel: int) -> dict[str, torch.Tensor]:
        buffers = _empty_buffers(self.codec, numel)
        buffers["w"] = torch.empty(1, dtype=torch.float64)
        return buffers

    def _ag_buffers(
        self, numel: int, members: int, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if self._identity:
            # fp32 on the wire: the reduced piece lands in its final place, no copy
            buffers = {"b0": target.view(torch.uint8)}
        else:
            buffers = _empty_buffers(self.codec, numel)
        buffers["w"] = torch.empty(1, dtype=torch.float64)
        buffers["c"] = torch.empty(members, dtype=torch.uint8)
        return buffers

    async def _wait_from(self, peer: str, pending: Any, deadline: float) -> Any:
        """Like :func:`_wait`, but give up as soon as ``peer`` disconnects."""
        if not self.node.is_connected(peer):
            # not connected (yet): the message may still come over a new connection
            return await _wait(pending, deadline)
        result: list[Any] = [None]
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                result[0] = await _wait(pending, deadline)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                while self.node.is_connected(peer):
                    await trio.sleep(0.05)
                # a disconnected peer may have delivered its last bytes just before
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()

            nursery.start_soon(receive)
            nursery.start_soon(watch)
        if result[0] is None and pending.done:
            return await _wait(pending, deadline)
        return result[0]

    async def _send(self, peer: str, tag: str, tensors: dict[str, Any], deadline: float) -> bool:
        try:
            with trio.fail_after(max(0.01, deadline - trio.current_time())):
                report = await self.node.dataplane.send(peer, tag, tensors)
            self.bytes_sent += report.nbytes
            return True
        except (GossamerError, trio.TooSlowError) as exc:
            log.info("all-reduce %s: sending %s to %s failed: %s", self.key, tag, peer[-8:], exc)
            return False

    async def _send_all(
        self, peers: list[str], tag: str, payload: dict[str, Any], deadline: float
    ) -> set[str]:
        """Send ``payload`` to every peer at once; return those it could not reach."""
        failed: set[str] = set()

        async def one(peer: str) -> None:
            if not await self._send(peer, tag, payload, deadline):
                failed.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        return failed

    async def _send_contributions(
        self,
        prefix: str,
        plan: Plan,
        j: int,
        owner: str,
        flat: torch.Tensor,
        weight: float,
        deadline: float,
        state: _AttemptState,
    ) -> None:
        for k, (a, b) in enumerate(plan.pieces(j)):
            encoded = await trio.to_thread.run_sync(self.codec.encode, flat[a:b])
            message = {**_buffers(encoded), "w": torch.tensor([weight], dtype=torch.float64)}
            if not await self._send(owner, f"{prefix}rs/{j}/{k}", message, deadline):
                state.unreachable.add(owner)
                return

    async def _reduce_my_part(
        self,
        prefix: str,
        plan: Plan,
        j: int,
        flat: torch.Tensor,
        weight: float,
        rs_pending: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadlines: tuple[float, float],
        state: _AttemptState,
    ) -> None:
        deadline, ag_deadline = deadlines
        # The reduced pieces go out in the background, so reducing piece k+1 overlaps sending
        # piece k (the data plane returns from a send only once the peer has verified it).
        async with trio.open_nursery() as senders:
            await self._reduce_pieces(
                prefix,
                plan,
                j,
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
        prefix: str,
        plan: Plan,
        j: int,
        flat: torch.Tensor,
        weight: float,
        rs_pending: dict[tuple[str, int], Any],
        out: torch.Tensor,
        deadline: float,
        ag_deadline: float,
        state: _AttemptState,
        senders: trio.Nursery,
    ) -> None:
        members = plan.members
        for k, (a, b) in enumerate(plan.pieces(j)):
            own = (
                flat[a:b]
                if self._identity
                else await trio.to_thread.run_sync(
                    lambda a=a, b=b: self.codec.decode(self.codec.encode(flat[a:b])).reshape(-1)
                )
            )
            pieces: dict[str, torch.Tensor] = {self.me: own}
            weights: dict[str, float] = {self.me: weight}
            for peer in members:
                if peer == self.me:
                    continue
                received = await self._wait_from(peer, rs_pending[(peer, k)], deadline)
                if received is None:
                    continue
                try:
                    piece_weight = float(received["w"][0])
                    if not (math.isfinite(piece_weight) and piece_weight > 0):
                        raise CodecError(f"weight {piece_weight!r} is not a positive number")
                    pieces[peer] = (
                        received["b0"].view(torch.float32)
                        if self._identity
                        else _decode(self.codec, b - a, received.tensors)
                    )
                    weights[peer] = piece_weight
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
            for peer, why in screen(pieces).items():
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
            encoded, total = await trio.to_thread.run_sync(
                self._reduce_into, {p: (pieces[p], weights[p]) for p in contributors}, out, a, b
            )
            state.record(self.me, contributors, total)
            mask = torch.tensor([p in pieces for p in members], dtype=torch.uint8)
            message = {
                **_buffers(encoded),
                "w": torch.tensor([total], dtype=torch.float64),
                "c": mask,
            }
            for peer in members:
                if peer != self.me:
                    senders.start_soon(
                        self._send, peer, f"{prefix}ag/{j}/{k}", message, ag_deadline
                    )

    def _reduce_into(
        self,
        contributions: dict[str, tuple[torch.Tensor, float]],
        out: torch.Tensor,
        a: int,
        b: int,
    ) -> tuple[EncodedTensor, float]:
        """Reduce one piece, encode it for the all-gather and keep its decoded bits in ``out``."""
        reduced, total = reduce_piece(contributions)
        if self._identity:
            out[a:b] = reduced
            return self.codec.encode(out[a:b]), total
        encoded = self.codec.encode(reduced)
        out[a:b] = self.codec.decode(encoded).reshape(-1)
        return encoded, total

    async def _receive_part(
        self,
        plan: Plan,
        j: int,
        k: int,
        pending: Any,
        out: torch.Tensor,
        deadline: float,
        state: _AttemptState,
    ) -> None:
        a, b = plan.pieces(j)[k]
        owner = plan.members[j]
        received = await self._wait_from(owner, pending, deadline)
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
            contributors = [p for p, bit in zip(plan.members, mask.tolist(), strict=True) if bit]
            total = float(received["w"][0])
        except (CodecError, KeyError, ValueError) as exc:
            log.warning(
                "all-reduce %s: part %d from %s is malformed: %s", self.key, j, owner[-8:], exc
            )
            state.missing_parts.add(owner)
            return
        state.record(owner, contributors, total)

    async def _exchange_statuses(
        self, prefix: str, members: list[str], mine: Status
    ) -> dict[str, Status]:
        statuses = {self.me: mine}
        payload = {"s": mine.pack()}
        timeout = 2.0 + self.node.config.dial_timeout / 2
        deadline = trio.current_time() + timeout
        pending = {
            p: self.node.dataplane.post_recv(p, f"{prefix}st") for p in members if p != self.me
        }
        unreachable = await self._send_all(list(pending), f"{prefix}st", payload, deadline)
        for peer, receive in pending.items():
            # A peer we could not reach (its process is gone) will not answer either.
            received = None if peer in unreachable else await _wait(receive, deadline)
            if received is None:
                continue
            try:
                statuses[peer] = Status.unpack(bytes(received["s"]), members)
            except (ValueError, GossamerError, msgpack.ExtraData) as exc:
                log.warning("all-reduce %s: bad status from %s: %s", self.key, peer[-8:], exc)
        return statuses

    async def _agree(
        self,
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
            if proposal == [self.me] or self.me not in proposal:
                return proposal
            tag = f"{prefix}mv/{round_}"
            payload = {"m": wire.pack(proposal)}
            if deadline is None or round_ > 0:
                deadline = trio.current_time() + 2.0 + self.node.config.dial_timeout / 2
            pending = {p: self.node.dataplane.post_recv(p, tag) for p in proposal if p != self.me}
            unreachable = await self._send_all(list(pending), tag, payload, deadline)
            views = [set(proposal)]
            for peer, receive in pending.items():
                received = None if peer in unreachable else await _wait(receive, deadline)
                view = _peer_list(received["m"]) if received is not None else None
                if view is None or self.me not in view:
                    views.append(set(proposal) - {peer})
                else:
                    views.append(view)
            agreed = sorted(set.intersection(*views))
            log.debug(
                "all-reduce %s %s: proposal %s, views %s, unreachable %s",
                self.key,
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


@dataclass
class _AttemptState:
    missing_parts: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    contributors_by_owner: dict[str, set[str]] = field(default_factory=dict)
    totals: set[float] = field(default_factory=set)

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


async def _wait(pending: Any, deadline: float) -> Any:
    """The received message, or None if it did not come before ``deadline``."""
    try:
        return await pending.wait(max(0.0, deadline - trio.current_time()))
    except GossamerError:
        return None


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
) -> AllReduceResult:
    """Tokens-weighted mean of ``flat`` across ``members``; see the module docstring.

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
    )
    return await collective.run(flat, weight)


Screen = Callable[[dict[str, torch.Tensor]], dict[str, str]]
