"""Bounded msgpack decoding: bombs of every shape are refused before they are built.

A bomb is a few MiB of msgpack whose every container is within the per-container
limit but whose whole is millions of objects.  Each must be refused with
ProtocolError having allocated next to nothing (tracemalloc), while every
legitimate message, up to a full state vector of 100k entries, decodes as before.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import tracemalloc

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.node import ProtocolError, wire

PEAK_LIMIT = 64 << 20


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 65536 else b"\xdd" + struct.pack(">I", n)


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 65536 else b"\xdf" + struct.pack(">I", n)


def open_path(item: bytes, width: int = 99_999, size: int = 4 << 20) -> bytes:
    """[item × width, [item × width, [ … ]]]: every level stays open until the input ends."""
    level = array_header(width + 1) + item * width
    return level * (size // len(level)) + b"\x90"


BOMBS = {
    # 100k arrays of 40 empty arrays: 4M tiny containers
    "nested_lists": lambda: array_header(100_000) + (array_header(40) + b"\x90" * 40) * 100_000,
    # 100k maps of 15 {int: {}}: 1.5M empty maps
    "nested_maps": lambda: (
        array_header(100_000)
        + (map_header(15) + b"".join(bytes([i, 0x80]) for i in range(15))) * 100_000
    ),
    # a flat array of 1M small ints, and the same as 10 arrays of 100k
    "flat_ints": lambda: msgpack.packb(list(range(1000, 1_001_000))),
    "chunked_ints": lambda: msgpack.packb(
        [list(range(i * 100_000, (i + 1) * 100_000)) for i in range(10)]
    ),
    # a map of 500k entries, and the same as 5 maps of 100k
    "flat_map": lambda: msgpack.packb({i: 1 for i in range(500_000)}),
    "chunked_maps": lambda: msgpack.packb(
        [{i: 1 for i in range(k * 100_000, (k + 1) * 100_000)} for k in range(5)]
    ),
    # wide containers left open while the next level is read (a decoder that counts a
    # container only once it is complete holds all of them)
    "open_path_lists": lambda: open_path(b"\x90"),
    "open_path_ints": lambda: open_path(b"\xcd\x12\x34"),
    "open_path_strings": lambda: open_path(b"\xa2ab"),
}


@pytest.mark.parametrize("shape", sorted(BOMBS))
def test_a_bomb_is_refused_within_bounded_memory(shape):
    data = BOMBS[shape]()
    assert len(data) > 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            wire.unpack(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"{shape}: peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("shape", sorted(BOMBS))
async def test_a_bomb_is_refused_off_the_event_loop(shape):
    with pytest.raises(ProtocolError):
        await wire.unpack_async(BOMBS[shape]())


def test_the_object_budget_is_exact():
    data = msgpack.packb([list(range(10)), {"a": 1, "b": [2, 3]}])
    assert wire.scan(data) == 1 + 2 + 10 + 4 + 2
    assert wire.unpack(data, max_objects=19) == [list(range(10)), {"a": 1, "b": [2, 3]}]
    with pytest.raises(ProtocolError, match="too many objects"):
        wire.unpack(data, max_objects=18)


def test_depth_and_container_limits():
    nested = msgpack.packb([[[1]]])  # the 1 is at depth 4
    assert wire.unpack(nested, max_depth=4) == [[[1]]]
    with pytest.raises(ProtocolError, match="nesting"):
        wire.unpack(nested, max_depth=3)
    with pytest.raises(ProtocolError, match="nesting"):
        wire.unpack(b"\x91" * 40 + b"\x90")  # 41 levels, over MAX_DEPTH
    assert wire.unpack(msgpack.packb([0] * 8), max_container=8) == [0] * 8
    with pytest.raises(ProtocolError, match="container"):
        wire.unpack(msgpack.packb([0] * 9), max_container=8)
    with pytest.raises(ProtocolError, match="container"):
        wire.unpack(msgpack.packb({i: i for i in range(9)}), max_container=8)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x92\x01",  # an array of two with one item
        b"\xdc\x00",  # a length field cut short
        b"\xc4\x10abc",  # a bin longer than the input
        b"\x01\x02",  # trailing bytes
        b"\xc1",  # the one byte msgpack never uses
        b"\xd4\x01\x00",  # fixext
        b"\xc7\x01\x05x",  # ext 8
        msgpack.packb({(1, 2): 3}),  # an unhashable key
        b"\xa2\xff\xfe",  # a string that is not UTF-8
    ],
)
def test_malformed_input_is_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        wire.unpack(data)


def test_legitimate_messages_decode_as_before():
    sv = {(i * 7919) << 30: i for i in range(100_000)}  # a full state vector
    message = [3, 99, sv]
    assert wire.unpack(msgpack.packb(message), max_objects=2 * len(sv) + 8) == message
    assert wire.unpack(msgpack.packb(message)) == message  # within the default budget
    envelope = [1, b"k" * 32, b"s" * 64, b"u" * (4 << 20)]
    assert wire.unpack(wire.pack(envelope), max_objects=5) == envelope
    request = {"i": 7, "m": "dht.find_node", "p": {"key": b"x" * 32, "n": 20}, "t": 5000.5}
    assert wire.unpack(wire.pack(request)) == request


async def test_unpack_async_decodes_large_inputs_on_a_worker_thread(monkeypatch):
    threads: list[threading.Thread] = []
    real = wire.unpack

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(wire, "unpack", recording)
    small = [1, b"x" * 100]
    large = [1, b"x" * (wire.THREAD_THRESHOLD + 1)]
    assert await wire.unpack_async(wire.pack(small)) == small
    assert await wire.unpack_async(wire.pack(large), max_objects=3) == large
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread()
    # many at once: all answered, each with its own result
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = await wire.unpack_async(wire.pack([i, b"y" * (100 << 10)]))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert {i: r[0] for i, r in results.items()} == {i: i for i in range(8)}


def count_objects(obj) -> int:
    if isinstance(obj, list):
        return 1 + sum(count_objects(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(count_objects(k) + count_objects(v) for k, v in obj.items())
    return 1


def depth_of(obj) -> int:
    if isinstance(obj, list):
        return 1 + max((depth_of(x) for x in obj), default=0)
    if isinstance(obj, dict):
        return 1 + max((max(depth_of(k), depth_of(v)) for k, v in obj.items()), default=0)
    return 1


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.integers(-(2**40), 2**40) | st.text(max_size=8), children, max_size=20)
    ),
    max_leaves=200,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_scan_counts_what_msgpack_builds(obj):
    data = msgpack.packb(obj, use_bin_type=True)
    assert wire.scan(data) == count_objects(obj)
    depth = depth_of(obj)
    assert wire.unpack(data, max_depth=depth) == obj
    if depth > 1:
        with pytest.raises(ProtocolError):
            wire.unpack(data, max_depth=depth - 1)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_any_corruption_is_a_protocol_error_or_a_value(obj, data):
    encoded = bytearray(msgpack.packb(obj, use_bin_type=True))
    cut = data.draw(st.integers(0, len(encoded)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
    for where, byte in flips:
        if encoded:
            encoded[where % len(encoded)] = byte
    for candidate in (bytes(encoded[:cut]), bytes(encoded)):
        with contextlib.suppress(ProtocolError):
            wire.unpack(candidate, max_objects=10_000)
