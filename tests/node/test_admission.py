"""Connection admission: the pure rules, and a lock-out attempt through real sockets."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio
from conftest import wait_until
from tcp_proxy import TcpProxy

from gossamer.node import GossamerError, Node
from gossamer.node.admission import Admission, AdmissionLimits, subnet_of

STRICT = AdmissionLimits(
    handshakes_per_ip=2,
    handshakes_per_subnet=3,
    handshakes_total=5,
    connections_per_ip=2,
    max_connections=3,
    evict_idle_after=30.0,
    exempt_loopback=False,
)


def test_half_open_handshakes_are_capped_per_ip_subnet_and_in_all() -> None:
    admission = Admission(STRICT)
    assert admission.begin_handshake("203.0.113.1") is None
    assert admission.begin_handshake("203.0.113.1") is None
    assert admission.begin_handshake("203.0.113.1") is not None  # per IP
    assert admission.begin_handshake("203.0.113.2") is None
    assert admission.begin_handshake("203.0.113.3") is not None  # per /24
    assert admission.begin_handshake("198.51.100.1") is None
    assert admission.begin_handshake("192.0.2.1") is None
    assert admission.begin_handshake("192.0.2.9") is not None  # in all (5)
    admission.end_handshake("203.0.113.1")
    assert admission.begin_handshake("203.0.113.1") is None  # its slot came back
    assert admission.refused == {
        "handshakes_per_ip": 1,
        "handshakes_per_subnet": 1,
        "handshakes_total": 1,
    }


def test_an_address_at_its_connection_cap_gets_one_handshake_a_second() -> None:
    admission = Admission(STRICT)  # connections_per_ip=2, full_ip_handshake_every=1.0
    ip = "203.0.113.1"
    assert admission.begin_handshake(ip, connections_from_ip=1, now=0.0) is None
    admission.end_handshake(ip)
    assert admission.begin_handshake(ip, connections_from_ip=1, now=0.1) is None  # not full
    admission.end_handshake(ip)
    # full: one handshake (a peer we need may be behind that address) ...
    assert admission.begin_handshake(ip, connections_from_ip=2, now=0.2) is None
    admission.end_handshake(ip)
    # ... and its redials within the second are refused before any byte is read
    assert admission.begin_handshake(ip, connections_from_ip=2, now=0.5) is not None
    assert admission.begin_handshake("203.0.113.2", connections_from_ip=2, now=0.5) is None
    admission.end_handshake("203.0.113.2")
    assert admission.begin_handshake(ip, connections_from_ip=2, now=1.2) is None
    admission.end_handshake(ip)
    assert admission.refused == {"full_ip_redial": 1}
    # an address that stopped redialling is forgotten
    assert admission.begin_handshake("198.51.100.1", connections_from_ip=2, now=100.0) is None
    assert set(admission._full_ip_tried) == {"198.51.100.1"}


def test_loopback_is_exempt_only_when_configured() -> None:
    lax = Admission(AdmissionLimits(handshakes_per_ip=1))
    assert all(lax.begin_handshake("127.0.0.1") is None for _ in range(10))
    strict = Admission(STRICT)
    assert strict.begin_handshake("127.0.0.1") is None
    assert strict.begin_handshake("127.0.0.1") is None
    assert strict.begin_handshake("127.0.0.1") is not None


def test_subnets() -> None:
    assert subnet_of("203.0.113.77") == "203.0.113.0/24"
    assert subnet_of("2001:db8::1") == "2001:db8::/64"
    assert subnet_of("not an ip") == "not an ip"


def _connected(admission, protected=False, protected_peers=(), **changes):
    base = {
        "connections_from_ip": 1,
        "total": 2,
        "peer_id": "new",
        "idle_since": {"a": 0.0, "b": 50.0},
        "now": 100.0,
    }
    named = {*protected_peers, *(["new"] if protected else [])}
    return admission.on_connected(
        "203.0.113.1", protected_peers=lambda: named, **{**base, **changes}
    )


def test_a_full_node_evicts_the_idlest_stranger_never_a_protected_or_busy_peer() -> None:
    admission = Admission(STRICT)
    assert _connected(admission).admit  # under the cap
    decision = _connected(admission, total=4)
    assert decision.admit and decision.evict == "a"  # idle for 100 s
    decision = _connected(admission, total=4, protected_peers={"a"})
    assert decision.admit and decision.evict == "b"  # idle for 50 s
    decision = _connected(admission, total=4, protected_peers={"a"}, now=60.0)
    assert not decision.admit  # b was active 10 s ago: nobody is idle enough
    decision = _connected(admission, total=4, protected=True, protected_peers={"a", "b"})
    assert decision.admit and decision.evict is None  # we need this peer
    assert not _connected(admission, connections_from_ip=3).admit  # per IP


@pytest.mark.parametrize("flood", [400])  # more than the swarm's 272 inbound slots
async def test_a_flood_of_half_open_connections_does_not_lock_out_an_honest_peer(
    node_config, flood
) -> None:
    # the attacker floods from 127.0.1.5 (its own /24 on loopback); the honest peer comes from
    # 127.0.0.1; the hub treats loopback addresses as strangers here
    config = node_config("hub", admission_exempt_loopback=False)
    async with Node(config) as hub, Node(node_config("honest")) as honest:
        port = int(hub.addrs()[0].split("/tcp/")[1].split("/")[0])
        sockets: list[socket.socket] = []
        stop = trio.Event()

        async def keep_flooding() -> None:
            # a socket the hub dropped is replaced: the flood lasts as long as the test
            while not stop.is_set():
                for sock in [s for s in sockets if _closed_by_peer(s)]:
                    sockets.remove(sock)
                    sock.close()
                for _ in range(min(100, flood - len(sockets))):  # at most 2000 new a second
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.bind(("127.0.1.5", 0))
                    with contextlib.suppress(BlockingIOError):
                        sock.connect(("127.0.0.1", port))
                    sockets.append(sock)
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_flooding)
            await trio.sleep(0.5)
            took = []
            for _ in range(10):
                start = trio.current_time()
                with trio.move_on_after(2), contextlib.suppress(GossamerError):
                    await honest.connect(hub.addrs()[0])
                    await honest.ping(hub.peer_id, timeout=2)
                    took.append(trio.current_time() - start)
                await honest.disconnect(hub.peer_id)
                await trio.sleep(0.1)
            stop.set()
        for sock in sockets:
            sock.close()
        assert len(took) >= 9, took
        assert hub.admission.refused["handshakes_per_ip"] > 0


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize(
    "addresses, per_address, evict_after",
    [
        # one address, more hosts than the node has slots: the per-IP cap keeps room for others
        (["127.0.1.6"], 48, 30.0),
        # two subnets, each under its per-IP cap, together over the node's slots: the node is
        # full, and the honest newcomer gets in by evicting a connection idle long enough
        (["127.0.1.7", "127.0.2.7"], 24, 1.0),
    ],
)
async def test_a_flood_of_idle_libp2p_hosts_does_not_lock_out_an_honest_peer(
    node_config, addresses, per_address, evict_after
) -> None:
    config = node_config(
        "hub",
        admission_exempt_loopback=False,
        max_connections=40,
        admission_evict_idle_after=evict_after,
    )
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(Node(config))
        honest = await stack.enter_async_context(Node(node_config("honest")))
        host, port = "127.0.0.1", int(hub.addrs()[0].split("/tcp/")[1].split("/")[0])
        nursery = await stack.enter_async_context(trio.open_nursery())
        # the honest peer comes from an address of its own too: whatever the idle hosts dial
        # without the proxy (the hub's own address, learned through identify) comes from
        # 127.0.0.1, and is part of the flood
        honest_port = await nursery.start(TcpProxy((host, port), source="127.0.3.3").serve)
        honest_via = f"/ip4/127.0.0.1/tcp/{honest_port}/p2p/{hub.peer_id}"
        idle: list[tuple[Node, str]] = []
        for i, source in enumerate(addresses):
            # each attacker's connections reach the hub from ``source`` (a real TCP proxy)
            proxy = TcpProxy((host, port), source=source)
            proxy_port = await nursery.start(proxy.serve)
            via = f"/ip4/127.0.0.1/tcp/{proxy_port}/p2p/{hub.peer_id}"
            for j in range(per_address):
                node = await stack.enter_async_context(Node(node_config(f"idle{i}-{j}")))
                idle.append((node, via))
        stop = trio.Event()
        most_from_one_ip = [0]

        async def stay_connected(node: Node, via: str) -> None:
            # an idle host: holds its connection open, sends nothing, and comes back when dropped
            while not stop.is_set():
                if not node.is_connected(hub.peer_id):
                    with contextlib.suppress(GossamerError), trio.move_on_after(2):
                        await node.connect(via)
                await trio.sleep(0.2)

        async def watch_hub() -> None:
            while not stop.is_set():
                by_ip: dict[str, int] = {}
                for peer in hub.peers.connected():  # the admitted ones
                    ip = peer.remote_addr.split("/")[2] if peer.remote_addr else ""
                    by_ip[ip] = by_ip.get(ip, 0) + 1
                most_from_one_ip[0] = max([most_from_one_ip[0], *by_ip.values()])
                await trio.sleep(0.1)

        for node, via in idle:
            nursery.start_soon(stay_connected, node, via)
        nursery.start_soon(watch_hub)
        # the flood is on: every idle host has tried at least once
        await trio.sleep(3 + evict_after)
        took = []
        for _ in range(10):
            start = trio.current_time()
            with trio.move_on_after(2), contextlib.suppress(GossamerError):
                await honest.connect(honest_via)
                await honest.ping(hub.peer_id, timeout=2)
                took.append(trio.current_time() - start)
            await honest.disconnect(hub.peer_id)
            await trio.sleep(0.1)
        stop.set()
        nursery.cancel_scope.cancel()
    assert len(took) >= 9, took
    assert most_from_one_ip[0] <= 32  # the per-IP cap held while the flood went on
    if len(addresses) == 1:
        assert hub.admission.refused["connections_per_ip"] > 0
        # once full, the address's redials were refused before the handshake, not after it
        assert hub.admission.refused["full_ip_redial"] > hub.admission.refused["connections_per_ip"]
    else:
        assert hub.admission.evicted > 0  # the node was full and made room


async def test_inbound_slots_come_back_when_connections_close(node_config) -> None:
    # py-libp2p kept a closed inbound connection's slot until the node stopped: after
    # max_connections + 16 inbound connections over its life, a node refused every new one
    async with Node(node_config("hub", max_connections=4)) as hub, Node(node_config()) as peer:
        for _ in range(30):  # > 4 + 16 slots
            await peer.connect(hub.addrs()[0])
            await peer.ping(hub.peer_id, timeout=2)
            await peer.disconnect(hub.peer_id)
            await wait_until(lambda: not hub.is_connected(peer.peer_id), timeout=5)
