"""Who sends what to whom in an all-reduce, under which data-plane tag: the pure schedule.

Every message of one all-reduce ``key`` travels under a tag of this grammar (the one place
tags are written or read)::

    ar/<key>/<scope>/rs/<part>/<piece>   a contribution: piece <piece> of part <part>, to its owner
    ar/<key>/<scope>/ag/<part>/<piece>   a reduced piece of part <part>, from its owner to everyone
    ar/<key>/<scope>/vs/<part>/<piece>   the same contribution, to the part's verifier
    ar/<key>/<scope>/vh/<part>/<piece>   the verifier's digest of the owner's reduced piece
    ar/<key>/<scope>/st                  a member's status after the attempt
    ar/<key>/<scope>/mv/<round>          a member's membership view in an agreement round

``<scope>`` is the attempt number, or ``join`` for the agreement before the first attempt (which
sends only views). ``<key>`` may itself contain slashes, so tags are read from the right.
``<part>`` is the owner's index in the sorted member list.

:class:`AllReduceSchedule` answers, for one member of one attempt, which part it owns, which
receives it posts from whom and which sends it makes; members that agree on the member list
compute matching schedules, so every send meets exactly one posted receive. No I/O, no clock:
the trio code in :mod:`~gossamer.training.collective` and
:mod:`~gossamer.training.collective_exchange` only moves the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast

from gossamer.training.collective_plan import DEFAULT_PIECE_ELEMS, Plan

JOIN: Final = "join"  # the scope of the agreement on members before the first attempt
PROBE: Final = "probe"  # transfers that measure a link no all-reduce has measured yet

Scope = int | Literal["join", "probe"]
Kind = Literal["rs", "ag", "vs", "vh", "st", "mv"]

# how many numbers follow each kind of tag
_ARITY: Final[dict[str, int]] = {"rs": 2, "ag": 2, "vs": 2, "vh": 2, "st": 0, "mv": 1}


def scope_prefix(key: str, scope: Scope) -> str:
    """The prefix every tag of ``scope`` starts with (what the data plane drops afterwards)."""
    _check_scope(scope)
    return f"ar/{key}/{scope}/"


def keys_prefix(root: str) -> str:
    """The prefix of every tag whose key is ``<root>/…`` (a run's all-reduces: one guard)."""
    return f"ar/{root}/"


def _check_scope(scope: object) -> None:
    if scope in (JOIN, PROBE):
        return
    if isinstance(scope, bool) or not isinstance(scope, int) or scope < 0:
        raise ValueError(f"scope must be an attempt number, {JOIN!r} or {PROBE!r}, not {scope!r}")


def _number(text: str) -> int:
    """A non-negative decimal exactly as ``str(int)`` writes it (so parse inverts format)."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"not a tag number: {text!r}")
    return int(text)


@dataclass(frozen=True)
class Tag:
    """One data-plane tag of an all-reduce; ``str(tag)`` is its wire form."""

    key: str
    scope: Scope
    kind: Kind
    numbers: tuple[int, ...] = ()  # rs/ag: (part, piece); mv: (round,); st: ()

    def __post_init__(self) -> None:
        _check_scope(self.scope)
        if self.kind not in _ARITY:
            raise ValueError(f"unknown tag kind {self.kind!r}")
        if len(self.numbers) != _ARITY[self.kind]:
            raise ValueError(f"a {self.kind} tag takes {_ARITY[self.kind]} numbers")
        if not all(type(n) is int and n >= 0 for n in self.numbers):
            raise ValueError(f"tag numbers must be non-negative integers: {self.numbers!r}")
        if self.scope == JOIN and self.kind != "mv":
            raise ValueError("the join scope carries only membership views")

    @classmethod
    def contribution(cls, key: str, attempt: int, part: int, piece: int) -> Tag:
        return cls(key, attempt, "rs", (part, piece))

    @classmethod
    def reduced(cls, key: str, attempt: int, part: int, piece: int) -> Tag:
        return cls(key, attempt, "ag", (part, piece))

    @classmethod
    def verifier_copy(cls, key: str, attempt: int, part: int, piece: int) -> Tag:
        return cls(key, attempt, "vs", (part, piece))

    @classmethod
    def verifier_digest(cls, key: str, attempt: int, part: int, piece: int) -> Tag:
        return cls(key, attempt, "vh", (part, piece))

    @classmethod
    def status(cls, key: str, attempt: int) -> Tag:
        return cls(key, attempt, "st")

    @classmethod
    def view(cls, key: str, scope: Scope, round_: int) -> Tag:
        return cls(key, scope, "mv", (round_,))

    def __str__(self) -> str:
        return "/".join([scope_prefix(self.key, self.scope) + self.kind, *map(str, self.numbers)])

    @classmethod
    def parse(cls, text: str) -> Tag:
        """The tag ``text`` is the wire form of; ValueError if it is not one."""
        fields = text.split("/")
        # read from the right: the key may contain slashes; the kinds' tails never collide
        for kind, arity in _ARITY.items():
            head = len(fields) - arity - 1  # index of the kind
            if head >= 3 and fields[0] == "ar" and fields[head] == kind:
                try:
                    numbers = tuple(_number(f) for f in fields[head + 1 :])
                    raw_scope = fields[head - 1]
                    scope: Scope = JOIN if raw_scope == JOIN else _number(raw_scope)
                except ValueError:
                    continue
                return cls("/".join(fields[1 : head - 1]), scope, cast(Kind, kind), numbers)
        raise ValueError(f"not an all-reduce tag: {text!r}")


@dataclass(frozen=True)
class Transfer:
    """One message of an attempt's exchange: piece ``piece`` of part ``part`` (elements
    ``start:end`` of the flat vector) from ``sender`` to ``receiver`` under ``tag``."""

    sender: str
    receiver: str
    tag: str
    part: int
    piece: int
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class AllReduceSchedule:
    """The messages member ``me`` sends and awaits in attempt ``attempt`` of all-reduce ``key``.

    Part ``j`` of ``plan`` belongs to ``plan.members[j]``. Reduce-scatter: every other member
    sends each piece of part ``j`` to its owner under ``rs/j/k``; all-gather: the owner sends
    each reduced piece to every other member under ``ag/j/k``; then every member sends its
    status to every other under ``st``.
    """

    key: str
    attempt: int
    plan: Plan
    me: str
    verify: bool = True  # give every part a verifier (from three members on)

    def __post_init__(self) -> None:
        _check_scope(self.attempt)
        if self.me not in self.plan.members:
            raise ValueError("the local node must be one of the members")

    @classmethod
    def build(
        cls,
        key: str,
        attempt: int,
        members: Sequence[str],
        me: str,
        numel: int,
        piece_elems: int = DEFAULT_PIECE_ELEMS,
    ) -> AllReduceSchedule:
        """The schedule for ``members`` in any order: every member sorts the same way."""
        return cls(key, attempt, Plan(tuple(sorted(set(members))), numel, piece_elems), me)

    @property
    def members(self) -> tuple[str, ...]:
        return self.plan.members

    @property
    def others(self) -> list[str]:
        return [p for p in self.members if p != self.me]

    @property
    def my_part(self) -> int:
        """The index of the part this member owns (and reduces)."""
        return self.members.index(self.me)

    @property
    def prefix(self) -> str:
        """What every tag of this attempt starts with."""
        return scope_prefix(self.key, self.attempt)

    @property
    def status_tag(self) -> str:
        return str(Tag.status(self.key, self.attempt))

    @property
    def my_pieces(self) -> list[tuple[int, int]]:
        """The ``(start, end)`` element ranges of my part's pieces, in piece order."""
        return self.plan.pieces(self.my_part)

    def owner(self, part: int) -> str:
        return self.members[part]

    # ------------------------------------------------------------ verification
    # Each part has a verifier (from three members on): it receives a copy of every
    # contribution to the part, reduces it itself and checks the owner's result; it tells the
    # others a digest of the bytes it checked. The verifier of part j is the member
    # 1 + attempt mod (n-1) places after its owner, so a retry pairs every owner with
    # another verifier (a lying owner, or verifier, disagrees with two members in two attempts;
    # an honest one with only the liar).

    def verifier(self, part: int) -> str | None:
        n = len(self.members)
        if n < 3 or not self.verify:
            return None  # two members: nobody else to ask
        return self.members[(part + 1 + self.attempt % (n - 1)) % n]

    @property
    def verifier_of(self) -> dict[str, str]:
        """owner -> the verifier of its part (empty below three members)."""
        out = {}
        for j, owner in enumerate(self.members):
            v = self.verifier(j)
            if v is not None:
                out[owner] = v
        return out

    @property
    def verified_parts(self) -> list[int]:
        """The parts this member verifies."""
        return [j for j in range(len(self.members)) if self.verifier(j) == self.me]

    def _copy(self, sender: str, part: int, piece: int) -> Transfer:
        start, end = self.plan.pieces(part)[piece]
        tag = str(Tag.verifier_copy(self.key, self.attempt, part, piece))
        verifier = self.verifier(part)
        assert verifier is not None
        return Transfer(sender, verifier, tag, part, piece, start, end)

    def copies_to_verifier(self, part: int) -> list[Transfer]:
        """My contributions to ``part`` again, for its verifier (my own part's too)."""
        verifier = self.verifier(part)
        if verifier is None or verifier == self.me:
            return []
        return [self._copy(self.me, part, k) for k in range(len(self.plan.pieces(part)))]

    def copies_in(self, part: int) -> list[Transfer]:
        """Receives of the contributions to a part I verify: every other member's."""
        return [
            self._copy(peer, part, k)
            for k in range(len(self.plan.pieces(part)))
            for peer in self.others
        ]

    def _digest(self, receiver: str, part: int, piece: int) -> Transfer:
        start, end = self.plan.pieces(part)[piece]
        tag = str(Tag.verifier_digest(self.key, self.attempt, part, piece))
        verifier = self.verifier(part)
        assert verifier is not None
        return Transfer(verifier, receiver, tag, part, piece, start, end)

    def digests_out(self, part: int, piece: int) -> list[Transfer]:
        """My digest of a verified piece, to everyone but its owner."""
        owner = self.owner(part)
        return [self._digest(p, part, piece) for p in self.others if p != owner]

    def digests_in(self) -> list[Transfer]:
        """Receives of the verifiers' digests, for the parts I neither own nor verify."""
        return [
            self._digest(self.me, j, k)
            for j in range(len(self.members))
            if j != self.my_part and self.verifier(j) not in (None, self.me)
            for k in range(len(self.plan.pieces(j)))
        ]

    def _contribution(self, sender: str, part: int, piece: int) -> Transfer:
        start, end = self.plan.pieces(part)[piece]
        tag = str(Tag.contribution(self.key, self.attempt, part, piece))
        return Transfer(sender, self.owner(part), tag, part, piece, start, end)

    def _reduced(self, receiver: str, part: int, piece: int) -> Transfer:
        start, end = self.plan.pieces(part)[piece]
        tag = str(Tag.reduced(self.key, self.attempt, part, piece))
        return Transfer(self.owner(part), receiver, tag, part, piece, start, end)

    def contributions_in(self) -> list[Transfer]:
        """Receives for my part's contributions: piece by piece, every other member's."""
        j = self.my_part
        return [
            self._contribution(peer, j, k)
            for k in range(len(self.plan.pieces(j)))
            for peer in self.others
        ]

    def contributions_to(self, part: int) -> list[Transfer]:
        """My contributions to another member's part, in piece order."""
        if part == self.my_part:
            return []  # an owner's own contribution never leaves it
        return [self._contribution(self.me, part, k) for k in range(len(self.plan.pieces(part)))]

    def contributions_out(self) -> list[Transfer]:
        """All my reduce-scatter sends, part by part."""
        return [t for j in range(len(self.members)) for t in self.contributions_to(j)]

    def parts_in(self) -> list[Transfer]:
        """Receives for every other owner's reduced pieces, part by part."""
        return [
            self._reduced(self.me, j, k)
            for j in range(len(self.members))
            if j != self.my_part
            for k in range(len(self.plan.pieces(j)))
        ]

    def reduced_out(self, piece: int) -> list[Transfer]:
        """The all-gather sends of my part's reduced piece ``piece``, one per other member."""
        return [self._reduced(peer, self.my_part, piece) for peer in self.others]

    def parts_out(self) -> list[Transfer]:
        """All my all-gather sends, piece by piece."""
        pieces = len(self.plan.pieces(self.my_part))
        return [t for k in range(pieces) for t in self.reduced_out(k)]

    def sends(self) -> list[Transfer]:
        """Every piece message this member sends in the attempt."""
        return [*self.contributions_out(), *self.parts_out()]

    def receives(self) -> list[Transfer]:
        """Every piece message this member awaits in the attempt (all posted up front)."""
        return [*self.contributions_in(), *self.parts_in()]
