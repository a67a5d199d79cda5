"""A hostile peer on DCUtR, through real nodes on loopback: it names a third party's address in
CONNECT (a TCP listener this test owns, counting what it accepts) and tries to make the node dial
it.  Without a relayed connection nothing is dialed; through a relay the node answers a bounded
number of sessions per peer, each with a bounded number of connects."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import multiaddr
import trio
from conftest import wait_until

from gossamer.node import Node, NodeConfig
from gossamer.node._libp2p_compat import dcutr_hole_punch, read_dcutr, write_delimited
from gossamer.node.holepunch import DCUTR_PROTOCOL, SESSIONS_PER_PEER

FAST = {"autonat_delay": 0.05, "autonat_retry": 0.5, "autonat_timeout": 2.0}


class ThirdParty:
    """TCP listeners on 127.0.0.1 that count the connections they accept (and close them
    first, so no socket of the node's lingers on the same four-tuple)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ports: list[int] = []

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        await stream.aclose()

    def addr(self, i: int = 0) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[i]}"


@contextlib.asynccontextmanager
async def third_party(listeners: int = 1) -> AsyncIterator[ThirdParty]:
    party = ThirdParty()
    async with trio.open_nursery() as nursery:
        for _ in range(listeners):
            found = await trio.open_tcp_listeners(0, host="127.0.0.1")
            party.ports.append(found[0].socket.getsockname()[1])
            nursery.start_soon(trio.serve_listeners, party._serve, found)
        yield party
        nursery.cancel_scope.cancel()


async def session(attacker: Node, victim: Node, addrs: list[str]) -> bool:
    """One DCUtR exchange as a hostile initiator (CONNECT naming ``addrs``, then SYNC);
    True if the victim answered, False if it closed the stream."""
    hole_punch = dcutr_hole_punch()
    raw = [multiaddr.Multiaddr(a).to_bytes() for a in addrs]
    assert attacker.host is not None
    stream = await attacker.host.new_stream(victim.peer_id, DCUTR_PROTOCOL)
    try:
        with trio.fail_after(5):
            await write_delimited(stream, hole_punch(type=hole_punch.CONNECT, ObsAddrs=raw))
            try:
                answer = await read_dcutr(stream)
            except Exception:  # closed or reset: refused
                return False
            assert answer.type == hole_punch.CONNECT
            await write_delimited(stream, hole_punch(type=hole_punch.SYNC))
            return True
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


def refusal_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "DCUtR session from" in r.getMessage()]


async def test_a_directly_connected_peer_cannot_make_the_node_dial(nodes, caplog) -> None:
    async with nodes(2) as (victim, attacker), third_party() as target:
        await attacker.connect(victim.addrs()[0])
        assert victim.connection_kinds(attacker.peer_id) == ["direct"]
        with caplog.at_level(logging.WARNING, logger="gossamer.node"):
            for i in range(5):
                assert not await session(attacker, victim, [target.addr()])
                await wait_until(
                    lambda i=i: victim.holepunch.refused["not-relayed"] == i + 1,
                    what="the session refused",
                )
        # The refusal comes before any dial: the third party saw nothing.
        assert target.accepted == 0
        assert victim.holepunch.connects == 0
        assert victim.holepunch.state_of(attacker.peer_id) is None
        lines = refusal_lines(caplog)
        assert len(lines) == 1 and lines[0].exc_info is None  # once per peer per minute
        assert "relayed connection" in lines[0].getMessage()
        assert await attacker.ping(victim.peer_id) > 0  # the node serves on


@contextlib.asynccontextmanager
async def relayed_pair(
    node_config: Callable[..., NodeConfig], **victim_settings
) -> AsyncIterator[tuple[Node, Node]]:
    """(victim, attacker): the attacker reaches the victim only through a relay, and does not
    punch itself (so the connection stays relayed)."""
    async with Node(node_config(relay_service="on", **FAST)) as relay:
        victim_cfg = node_config(
            reachability="private", bootstrap=[relay.addrs()[0]], **victim_settings
        )
        async with (
            Node(victim_cfg) as victim,
            Node(node_config(reachability="private", holepunch=False)) as attacker,
        ):
            circuit = await wait_until(
                lambda: [a for a in victim.addrs() if "p2p-circuit" in a], what="a relayed address"
            )
            await attacker.connect(circuit[0])
            assert victim.connection_kinds(attacker.peer_id) == ["relayed"]
            yield victim, attacker


async def test_sessions_through_a_relay_are_bounded_per_peer(node_config, caplog) -> None:
    async with (
        relayed_pair(node_config, holepunch_timeout=1.0) as (victim, attacker),
        third_party(SESSIONS_PER_PEER + 1) as target,
    ):
        # An upgrade in progress is answered: the node dials what the peer named (one
        # listener per session, so no four-tuple is reused while the last one lingers).
        for i in range(SESSIONS_PER_PEER):
            assert await session(attacker, victim, [target.addr(i)])
            await wait_until(lambda i=i: target.accepted == i + 1, what="the punch dial")
        with caplog.at_level(logging.WARNING, logger="gossamer.node"):
            for _ in range(3):
                assert not await session(attacker, victim, [target.addr(SESSIONS_PER_PEER)])
            await wait_until(
                lambda: victim.holepunch.refused["peer-budget"] == 3, what="sessions refused"
            )
        assert target.accepted == SESSIONS_PER_PEER
        lines = refusal_lines(caplog)
        assert len(lines) == 1 and "too many sessions" in lines[0].getMessage()
        assert await attacker.ping(victim.peer_id) > 0
        assert victim.connection_kinds(attacker.peer_id) == ["relayed"]


async def test_a_session_makes_a_bounded_number_of_connects(node_config) -> None:
    """A closed port answers RST, which the node re-dials at once (routers that answer RST):
    one session still makes at most holepunch_max_connects connects."""
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    async with relayed_pair(node_config, holepunch_timeout=1.0, holepunch_max_connects=20) as (
        victim,
        attacker,
    ):
        # The victim's own attempts to punch to the attacker (it accepted the relayed
        # connection) fail in the exchange, before any dial: every connect is this session's.
        assert await session(attacker, victim, [f"/ip4/127.0.0.1/tcp/{port}"])
        await wait_until(lambda: victim.holepunch.connects >= 20, what="the re-dials")
        # The allowance is spent: the session waits out its window without another connect.
        await wait_until(lambda: not victim.holepunch._responding, what="the session over")
        assert victim.holepunch.connects == 20
