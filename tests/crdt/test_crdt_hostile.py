"""A hostile peer on the crdt protocol, through real streams on 127.0.0.1: msgpack bombs in
the hello (decoded before admission) are refused cheaply, the node keeps serving an honest
replica, and a peer that keeps trying does not fill the log."""

from __future__ import annotations

import contextlib
import logging
import struct

import pytest
import trio
from conftest import wait_until
from crdt_helpers import crdt_nodes

from gossamer.crdt import SyncOptions
from gossamer.crdt.protocol import (
    ERROR,
    HELLO,
    MAX_HELLO_BYTES,
    MAX_SV_ENTRIES,
    PROTOCOL,
    PROTOCOL_VERSION,
    hello_message,
)
from gossamer.node import Node, PeerUnreachable, wire


def array_header(n: int) -> bytes:
    return b"\xdc" + struct.pack(">H", n) if n < 65536 else b"\xdd" + struct.pack(">I", n)


def nested_lists(size: int) -> bytes:
    """About ``size`` bytes of arrays of 40 empty arrays: a million tiny objects per MiB."""
    inner = array_header(40) + b"\x90" * 40
    count = min(size // len(inner), 100_000)
    return array_header(count) + inner * count


def bomb_hellos(run_id: str) -> dict[str, bytes]:
    """Frames a hostile peer sends as its hello; each within the per-container limit."""
    near_limit = MAX_HELLO_BYTES - 4096
    deep_sv = {i: [[i]] for i in range(1000)}  # state vector entries nested too deep
    # two maps of 60k entries where one state vector belongs: more objects than a hello holds
    wide = b"\xde" + struct.pack(">H", 60_000) + _int_entries(60_000)
    wide_hello = b"\x95\x00\x01" + wire.pack(run_id) + wide + wide
    return {
        "4 MiB of nested lists": wire.frame(nested_lists(4 << 20)),
        "nested lists under the size limit": wire.frame(nested_lists(near_limit)),
        "a hello with a deep state vector": wire.frame(
            wire.pack([HELLO, PROTOCOL_VERSION, run_id, None, deep_sv])
        ),
        "a hello with two wide maps": wire.frame(wide_hello),
    }


def _int_entries(n: int) -> bytes:
    return b"".join(b"\xcd" + struct.pack(">H", i) + b"\x01" for i in range(n))


async def send_hello(node: Node, peer_id: str, frame: bytes) -> list | None:
    """Open a crdt stream, send ``frame`` as the hello; the decoded answer, or None if the
    stream was reset (even before the protocol was agreed) or closed without one."""
    try:
        stream = await node.open_stream(peer_id, PROTOCOL)
    except PeerUnreachable:
        return None
    try:
        with trio.move_on_after(5):
            try:
                await stream.write(frame)
                reply = await wire.FrameReader(stream).read_frame(1 << 16)
            except (ConnectionError, EOFError):
                return None
            return None if reply is None else wire.unpack(reply)
        raise AssertionError("the victim neither answered nor closed within 5 s")
    finally:
        await stream.reset()


def lines_about(caplog, peer_id: str, logger: str = "gossamer.crdt") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(logger) and peer_id[-8:] in r.getMessage()
    ]


@pytest.mark.parametrize("bomb", sorted(bomb_hellos("x-aaaaaaaaaaaaaaaa")))
async def test_a_hello_bomb_is_refused_and_the_node_keeps_serving(node_config, bomb):
    async with crdt_nodes([node_config() for _ in range(3)]) as (victim_s, evil_s, good_s):
        victim = await victim_s.host_run("bombed")
        victim_id, evil_id = victim_s.node.peer_id, evil_s.node.peer_id
        await evil_s.node.connect(victim_s.node.addrs()[0])
        frame = bomb_hellos(victim.run_id)[bomb]
        reply = await send_hello(evil_s.node, victim_id, frame)
        # refused: the stream reset (over the size limit) or a short error of ours
        assert reply is None or reply == [ERROR, "protocol", "malformed hello"]
        assert len(frame) - 4 > MAX_HELLO_BYTES or reply is not None
        # the refusal costs the sender points: a second bomb gets it banned
        assert not victim_s.is_banned(evil_id)
        await send_hello(evil_s.node, victim_id, frame)
        assert victim_s.is_banned(evil_id)
        # the victim still answers and still serves an honest replica
        assert await evil_s.node.ping(victim_id) > 0
        good = await good_s.join_run(victim.run_id, bootstrap=[victim_s.node.addrs()[0]])
        victim.doc.set_config(model="still here")
        await good.wait_for(lambda doc: doc.config().model == "still here", timeout=5)
        assert evil_id not in victim.doc.members()


async def test_a_full_size_honest_hello_is_still_accepted(node_config):
    """The lowered hello budgets hold the largest legitimate hello: a state vector of
    MAX_SV_ENTRIES entries with the largest ids and clocks."""
    async with crdt_nodes([node_config() for _ in range(2)]) as (host_s, peer_s):
        host = await host_s.host_run("wide")
        sv = {2**53 - 1 - i: 2**53 - 1 for i in range(MAX_SV_ENTRIES)}
        frame = hello_message(host.run_id, host.charter, sv)
        assert len(frame) - 4 <= MAX_HELLO_BYTES
        await peer_s.node.connect(host_s.node.addrs()[0])
        stream = await peer_s.node.open_stream(host_s.node.peer_id, PROTOCOL)
        try:
            await stream.write(frame)
            with trio.fail_after(5):
                reply = await wire.FrameReader(stream).read_frame(MAX_HELLO_BYTES)
        finally:
            await stream.reset()
        assert reply is not None
        answer = wire.unpack(reply)
        assert answer[:3] == [HELLO, PROTOCOL_VERSION, host.run_id]


async def test_a_peer_that_keeps_sending_bombs_costs_a_bounded_log(node_config, caplog):
    caplog.set_level(logging.INFO, logger="gossamer")
    async with crdt_nodes([node_config() for _ in range(2)]) as (victim_s, evil_s):
        victim = await victim_s.host_run("bombed")
        victim_id, evil_id = victim_s.node.peer_id, evil_s.node.peer_id
        await evil_s.node.connect(victim_s.node.addrs()[0])
        frame = bomb_hellos(victim.run_id)["nested lists under the size limit"]
        assert await send_hello(evil_s.node, victim_id, frame) is not None
        assert await send_hello(evil_s.node, victim_id, frame) is not None
        assert victim_s.is_banned(evil_id)  # two malformed hellos: banned
        after_two = len(lines_about(caplog, evil_id))
        for _ in range(10):  # refused unread while banned: no decode, no line
            assert await send_hello(evil_s.node, victim_id, frame) is None
        assert len(lines_about(caplog, evil_id)) == after_two <= 3


async def test_hellos_that_never_arrive_are_logged_once_per_interval(node_config, caplog):
    caplog.set_level(logging.INFO, logger="gossamer")
    async with crdt_nodes([node_config() for _ in range(2)]) as (victim_s, evil_s):
        await victim_s.host_run("quiet")
        victim_id, evil_id = victim_s.node.peer_id, evil_s.node.peer_id
        await evil_s.node.connect(victim_s.node.addrs()[0])
        complaints = victim_s.node.complaints
        before = complaints.total
        for _ in range(6):  # a frame that promises 100 bytes and ends after 10
            stream = await evil_s.node.open_stream(victim_id, PROTOCOL)
            await stream.write(struct.pack(">I", 100) + b"x" * 10)
            await stream.close()
            with trio.move_on_after(5):
                with contextlib.suppress(ConnectionError):
                    while await stream.read(1 << 16):
                        pass
            await stream.reset()
        await wait_until(lambda: complaints.total - before >= 6, 5, what="six complaints")
        assert len(lines_about(caplog, evil_id, "gossamer.crdt.handshake")) == 1
        assert not victim_s.is_banned(evil_id)  # a stream that ends is no offence


async def test_penalties_are_logged_once_per_interval(node_config, caplog):
    caplog.set_level(logging.INFO, logger="gossamer")
    options = SyncOptions(heartbeat_interval=0, anti_entropy_interval=0, ban_seconds=0)
    async with crdt_nodes([node_config() for _ in range(2)], options) as (victim_s, evil_s):
        victim = await victim_s.host_run("bombed")
        victim_id, evil_id = victim_s.node.peer_id, evil_s.node.peer_id
        await evil_s.node.connect(victim_s.node.addrs()[0])
        frame = bomb_hellos(victim.run_id)["a hello with a deep state vector"]
        for _ in range(5):  # ban_seconds=0: every one is decoded and refused
            assert await send_hello(evil_s.node, victim_id, frame) is not None
        assert len(lines_about(caplog, evil_id)) <= 2  # one line, and one for the ban
