"""Inputs for the fuzz campaign: mutations of valid messages (pure: a seeded ``random.Random``).

Each protocol gives valid *seeds* (whole messages as the wire carries them) and, when it speaks
msgpack, the decoded object with a function that frames one.  :class:`Mutator` derives inputs
from them by the kinds the issue names: random bytes, truncations, bit flips, huge length
prefixes, deep nesting, wide containers, wrong types and valid-but-out-of-range values, and
floods of valid messages.  The same seed and RNG state give the same inputs, so a crash found
once can be replayed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

KINDS = (
    "random",
    "truncate",
    "flip",
    "splice",
    "huge_length",
    "deep",
    "wide",
    "wrong_type",
    "out_of_range",
    "flood",
)

# values that are valid msgpack but wrong for most fields
_ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    -1,
    0,
    2**63 - 1,
    -(2**63),
    1e308,
    float("nan"),
    float("inf"),
    "",
    "x" * 10_000,
    b"",
    b"\x00" * 4096,
    [],
    [[[]]],
    {},
    {"": None},
    {1: 2},
)


@dataclass(frozen=True)
class Protocol:
    """What the fuzzer knows of one protocol."""

    name: str
    seeds: Sequence[bytes]  # valid messages, framed as on the wire
    objects: Sequence[Any] = ()  # the same messages decoded (msgpack protocols)
    encode: Callable[[Any], bytes] | None = None  # object -> framed message


class Mutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def input(self, protocol: Protocol) -> tuple[str, bytes]:
        """(kind, bytes) of one generated input."""
        kinds = [k for k in KINDS if protocol.encode is not None or k not in _STRUCTURED]
        kind = self.rng.choice(kinds)
        return kind, getattr(self, f"_{kind}")(protocol)

    # ----------------------------------------------------------------- byte level

    def _seed(self, protocol: Protocol) -> bytes:
        return self.rng.choice(list(protocol.seeds))

    def _random(self, protocol: Protocol) -> bytes:
        return self.rng.randbytes(self.rng.choice((1, 4, 16, 256, 4096, 65536)))

    def _truncate(self, protocol: Protocol) -> bytes:
        seed = self._seed(protocol)
        return seed[: self.rng.randrange(0, max(1, len(seed)))]

    def _flip(self, protocol: Protocol) -> bytes:
        data = bytearray(self._seed(protocol))
        for _ in range(self.rng.randint(1, 8)):
            if data:
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def _splice(self, protocol: Protocol) -> bytes:
        a, b = self._seed(protocol), self._seed(protocol)
        return a[: self.rng.randrange(len(a) + 1)] + b[self.rng.randrange(len(b) + 1) :]

    def _huge_length(self, protocol: Protocol) -> bytes:
        """A length prefix (4-byte big-endian or a varint) that promises far more than follows."""
        body = self._seed(protocol)[4:]
        if self.rng.random() < 0.5:
            return struct.pack(">I", self.rng.choice((2**31 - 1, 2**32 - 1, 1 << 30))) + body
        return b"\xff\xff\xff\xff\x0f" + body  # varint of 2**32 - 1

    def _flood(self, protocol: Protocol) -> bytes:
        return self._seed(protocol) * self.rng.choice((16, 256, 1024))

    # ------------------------------------------------------------ msgpack level

    def _deep(self, protocol: Protocol) -> bytes:
        depth = self.rng.choice((100, 1000, 100_000))
        nested = b"\x91" * depth + b"\xc0"  # fixarray of one, depth times
        return self._framed(protocol, nested)

    def _wide(self, protocol: Protocol) -> bytes:
        count = self.rng.choice((2**16, 2**31, 2**32 - 1))
        header = b"\xdd" + struct.pack(">I", count)  # array32 promising `count` items
        return self._framed(protocol, header + b"\xc0" * self.rng.choice((0, 10, 1000)))

    def _wrong_type(self, protocol: Protocol) -> bytes:
        obj = self._mutate_object(self.rng.choice(list(protocol.objects)), _ODD_VALUES)
        return self._encode(protocol, obj)

    def _out_of_range(self, protocol: Protocol) -> bytes:
        numbers = (-1, 2**31, 2**53 + 1, 2**63 - 1, 10**9, 1e9, -1e-9)
        obj = self._mutate_object(self.rng.choice(list(protocol.objects)), numbers)
        return self._encode(protocol, obj)

    def _mutate_object(self, obj: Any, values: Sequence[Any]) -> Any:
        """A copy of ``obj`` with one leaf (or container) replaced by one of ``values``."""
        if isinstance(obj, dict) and obj:
            key = self.rng.choice(list(obj))
            out = dict(obj)
            out[key] = (
                self._mutate_object(obj[key], values)
                if self.rng.random() < 0.5
                else self.rng.choice(values)
            )
            return out
        if isinstance(obj, list) and obj:
            i = self.rng.randrange(len(obj))
            out_list = list(obj)
            out_list[i] = (
                self._mutate_object(obj[i], values)
                if self.rng.random() < 0.5
                else self.rng.choice(values)
            )
            return out_list
        return self.rng.choice(values)

    def _encode(self, protocol: Protocol, obj: Any) -> bytes:
        assert protocol.encode is not None
        try:
            return protocol.encode(obj)
        except (TypeError, ValueError, OverflowError):  # an odd value msgpack refuses
            return self._seed(protocol)

    def _framed(self, protocol: Protocol, payload: bytes) -> bytes:
        """``payload`` (raw msgpack) in the protocol's framing: its encoder's prefix."""
        if protocol.encode is None:
            return payload
        probe = protocol.encode(None)
        packed_none = msgpack.packb(None)
        prefix = probe[: len(probe) - len(packed_none)]
        if len(prefix) == 4:  # a 4-byte length prefix: make it match the new payload
            return struct.pack(">I", len(payload)) + payload
        return prefix + payload


_STRUCTURED = {"deep", "wide", "wrong_type", "out_of_range"}

__all__ = ["KINDS", "Mutator", "Protocol"]
