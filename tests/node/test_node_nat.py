"""NAT traversal without root: the pure decisions, and relay/dial-back/DCUtR on loopback.

The real-NAT behaviour (cone and symmetric NATs, relay failover, UPnP) is
tested in tests/natlab/ (needs root).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from conftest import wait_until

from gossamer.node import Node, NodeConfig, PeerUnreachable
from gossamer.node.holepunch import dial_targets as punch_targets
from gossamer.node.holepunch import predicted_addrs
from gossamer.node.reachability import (
    PRIVATE,
    PUBLIC,
    UNKNOWN,
    Probe,
    _probes_from_answer,
    classify,
    dial_targets,
    is_public_ip,
)
from gossamer.node.relay_addrs import parse_circuit, target_peer, usable_relay_addr
from gossamer.node.relay_client import Candidate, rank
from gossamer.node.upnp import (
    UpnpError,
    parse_control_url,
    parse_soap_response,
    parse_ssdp_location,
)

FAST = {"autonat_delay": 0.05, "autonat_retry": 0.5, "autonat_timeout": 2.0}

# ------------------------------------------------------------------ pure


def probe(helper: str, ok: bool, addr: str = "/ip4/198.51.100.7/tcp/4001") -> Probe:
    return Probe(helper, addr, ok, "" if ok else "no answer", "198.51.100.7:5555", 1.0)


def test_classify_needs_agreeing_helpers() -> None:
    assert classify([], needed=2, helpers_available=0).status == UNKNOWN
    # One helper in the whole network decides alone.
    assert classify([probe("h1", False)], needed=2, helpers_available=1).status == PRIVATE
    assert classify([probe("h1", True)], needed=2, helpers_available=1).status == PUBLIC
    # Two could answer: one answer is not enough either way.
    verdict = classify([probe("h1", False)], needed=2, helpers_available=2)
    assert verdict.status == UNKNOWN
    assert "1 of 2 helpers answered" in verdict.evidence[0]
    assert classify([probe("h1", False), probe("h2", False)], needed=2, helpers_available=3).status
    both = classify([probe("h1", True), probe("h2", True)], needed=2, helpers_available=2)
    assert both.status == PUBLIC
    assert both.confirmed_addrs == ("/ip4/198.51.100.7/tcp/4001",)
    assert both.observed_ips == ("198.51.100.7",)
    assert any("succeeded" in line for line in both.evidence)
    # A helper that could not reach us does not veto one that did (and vice versa).
    mixed = classify([probe("h1", True), probe("h2", False)], needed=1, helpers_available=2)
    assert mixed.status == PUBLIC


def test_classify_forced_by_config() -> None:
    verdict = classify([probe("h1", True)], needed=1, helpers_available=1, forced="private")
    assert verdict.status == PRIVATE
    assert verdict.evidence[0] == "configured: reachability = private"


def test_helper_dials_only_the_observed_ip() -> None:
    targets, refused = dial_targets(
        [
            "/ip4/10.0.0.5/tcp/4001",  # LAN address: tried at the observed IP
            "/ip4/0.0.0.0/tcp/4002",
            "/ip4/203.0.113.9/tcp/4003",  # somebody else: refused
            "/ip4/198.51.100.7/tcp/4004",
            "not an address",
        ],
        "198.51.100.7",
    )
    assert targets == [("198.51.100.7", 4001), ("198.51.100.7", 4002), ("198.51.100.7", 4004)]
    assert [r["addr"] for r in refused] == ["/ip4/203.0.113.9/tcp/4003"]
    many = [f"/ip4/10.0.0.5/tcp/{4000 + i}" for i in range(10)]
    assert len(dial_targets(many, "198.51.100.7")[0]) == 4  # bounded per request
    assert dial_targets("nope", "1.2.3.4")[0] == []


def test_helper_answers_are_validated() -> None:
    assert _probes_from_answer("h", "garbage", 0.0) == []
    assert _probes_from_answer("h", {"results": "x"}, 0.0) == []
    good = {
        "observed": "198.51.100.7:1234",
        "results": [
            {"addr": "/ip4/198.51.100.7/tcp/4001", "ok": True},
            {"addr": "/ip4/1.2.3.4/tcp/1", "ok": "yes"},  # only True counts
            {"addr": "not/an/addr", "ok": True},
            "junk",
        ],
    }
    probes = _probes_from_answer("h", good, 0.0)
    assert [(p.addr, p.ok) for p in probes] == [
        ("/ip4/198.51.100.7/tcp/4001", True),
        ("/ip4/1.2.3.4/tcp/1", False),
    ]


def test_public_ip_includes_the_lab_internet() -> None:
    assert is_public_ip("203.0.113.18") and is_public_ip("198.51.100.2")
    assert is_public_ip("8.8.8.8")
    assert not is_public_ip("10.1.0.2") and not is_public_ip("127.0.0.1")
    assert not is_public_ip("0.0.0.0") and not is_public_ip("bogus")


def test_circuit_addresses() -> None:
    addr = "/ip4/203.0.113.18/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmTarget"
    assert parse_circuit(addr) == ("/ip4/203.0.113.18/tcp/4001", "QmRelay", "QmTarget")
    assert parse_circuit("/ip4/1.2.3.4/tcp/1/p2p/QmX") is None
    assert target_peer(addr) == "QmTarget"
    assert usable_relay_addr("/ip4/203.0.113.18/tcp/4001")
    assert not usable_relay_addr("/ip4/10.0.0.1/tcp/4001")
    assert not usable_relay_addr("/ip4/0.0.0.0/tcp/4001")


def test_relay_ranking() -> None:
    fast = Candidate("fast", rtt_ms=2.0)
    slow = Candidate("slow", rtt_ms=40.0)
    unknown = Candidate("unknown")
    flaky = Candidate("flaky", rtt_ms=1.0, failures=2)
    waiting = Candidate("waiting", rtt_ms=1.0, retry_at=100.0)
    ranked = rank([slow, flaky, unknown, fast, waiting], now=50.0, exclude=set())
    assert [c.peer_id for c in ranked] == ["fast", "slow", "unknown", "flaky"]
    assert [c.peer_id for c in rank([fast, slow], 50.0, exclude={"fast"})] == ["slow"]


def test_hole_punch_address_prediction() -> None:
    listen = [("0.0.0.0", 4001), ("10.1.0.2", 4005)]
    ours = predicted_addrs(listen, ["198.51.100.18"], ["/ip4/198.51.100.18/tcp/4001"])
    assert ours == [
        "/ip4/198.51.100.18/tcp/4001",  # confirmed first
        "/ip4/198.51.100.18/tcp/4005",  # port-preserving NAT prediction
        "/ip4/10.1.0.2/tcp/4005",  # same LAN
    ]
    theirs = [
        "/ip4/198.51.100.34/tcp/4001",
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/198.51.100.18/tcp/4001",  # our own address: never dialed
        "/ip4/0.0.0.0/tcp/1",
        "/dns4/example.com/tcp/1",
    ]
    assert punch_targets(theirs, {"198.51.100.18"}) == [("198.51.100.34", 4001)]


def test_upnp_parsing() -> None:
    answer = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n\r\n"
    assert parse_ssdp_location(answer) == "http://10.1.0.1:5000/rootDesc.xml"
    assert parse_ssdp_location(b"NOTIFY * HTTP/1.1\r\n\r\n") is None
    assert parse_ssdp_location(b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n") is None
    description = b"""<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">
      <device><serviceList><service>
        <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
        <controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>"""
    url, kind = parse_control_url("http://10.1.0.1:5000/rootDesc.xml", description)
    assert url == "http://10.1.0.1:5000/ctl/IPConn" and "WANIPConnection" in kind
    with pytest.raises(UpnpError):
        parse_control_url("http://x/", b"<root><device/></root>")
    with pytest.raises(UpnpError):  # entity expansion is never parsed
        parse_control_url("http://x/", b'<!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>')
    fault = b"""<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
      <s:Fault><detail><UPnPError><errorCode>718</errorCode>
      <errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail>
      </s:Fault></s:Body></s:Envelope>"""
    assert parse_soap_response(fault)["errorCode"] == "718"


# ------------------------------------------------------------- loopback


async def test_dial_back_is_a_fresh_connection_to_the_address(
    node_config: Callable[..., NodeConfig],
) -> None:
    """A dead address is not confirmed although the helper is connected to us
    (py-libp2p's AutoNAT would rate it reachable: LIBP2P-NOTES pitfall 5)."""
    async with Node(node_config(**FAST)) as a, Node(node_config(**FAST)) as b:
        await b.connect(a.addrs()[0])
        dead = trio.socket.socket()
        await dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        b.reachability.add_candidate(f"/ip4/127.0.0.1/tcp/{dead_port}")
        await wait_until(
            lambda: b.reachability.verdict.confirmed_addrs, 15, what="a confirmed address"
        )
        verdict = b.reachability.verdict
        assert verdict.status == PUBLIC
        own_port = b.addrs()[0].split("/")[4]
        assert verdict.confirmed_addrs == (f"/ip4/127.0.0.1/tcp/{own_port}",)
        evidence = " ".join(verdict.evidence)
        assert f"tcp/{dead_port} failed" in evidence and f"tcp/{own_port} succeeded" in evidence
        assert b.status()["reachability"]["status"] == PUBLIC


async def test_relayed_connection_carries_rpc_and_data_when_punching_is_off(
    node_config: Callable[..., NodeConfig],
) -> None:
    relay_cfg = node_config(relay_service="on", **FAST)
    async with Node(relay_cfg) as relay:
        boot = relay.addrs()[0]
        private = node_config(
            reachability="private", bootstrap=[boot], holepunch=False, relay_check_interval=0.5
        )
        dialer = node_config(reachability="private", holepunch=False)
        async with Node(private) as target, Node(dialer) as caller:
            circuit = await wait_until(
                lambda: [a for a in target.addrs() if "/p2p-circuit/" in a],
                15,
                what="a relayed address",
            )
            assert circuit[0].startswith(f"{boot}/p2p-circuit/p2p/")  # relay addr from identify
            assert await caller.connect(circuit[0]) == target.peer_id
            assert caller.connection_kinds(target.peer_id) == ["relayed"]
            assert await caller.ping(target.peer_id) > 0
            pending = target.dataplane.post_recv(caller.peer_id, "t")
            report = await caller.dataplane.send(target.peer_id, "t", {"x": b"\x07" * 300_000})
            received = await pending.wait(10)
            assert report.path == received.path == "relay"
            assert bytes(received.tensors["x"]) == b"\x07" * 300_000
            service = relay.relays.status()["service"]
            assert service["circuits"] == 1 and service["bytes_relayed"] > 300_000


async def test_dcutr_upgrades_a_relayed_connection(node_config: Callable[..., NodeConfig]) -> None:
    """On loopback there is no NAT: the DCUtR exchange and the dials still run."""
    async with Node(node_config(relay_service="on", **FAST)) as relay:
        boot = relay.addrs()[0]
        settings = {"reachability": "private", "holepunch_relay_grace": 0.2}
        async with (
            Node(node_config(bootstrap=[boot], **settings)) as target,
            Node(node_config(**settings)) as caller,
        ):
            circuit = await wait_until(
                lambda: [a for a in target.addrs() if "p2p-circuit" in a], what="a relayed address"
            )
            await caller.connect(circuit[0])
            await wait_until(
                lambda: caller.connection_kinds(target.peer_id) == ["direct"],
                what="the connection upgraded to direct",
            )
            state = caller.holepunch.state_of(target.peer_id)
            assert state is not None and state.state == "direct" and state.upgrade_ms is not None
            assert target.holepunch.state_of(caller.peer_id).role == "initiator"  # accepted side
            assert await caller.ping(target.peer_id) > 0


async def test_relay_limits(node_config: Callable[..., NodeConfig]) -> None:
    limits = {"relay_circuit_bytes": 200_000, "relay_max_reservations": 1}
    async with Node(node_config(relay_service="on", **limits)) as relay:
        boot = relay.addrs()[0]
        private = {"reachability": "private", "holepunch": False, "relay_check_interval": 0.5}
        async with (
            Node(node_config(bootstrap=[boot], **private)) as first,
            Node(node_config(bootstrap=[boot], **private)) as second,
            Node(node_config(**private)) as caller,
        ):

            def circuits(n: Node) -> list[str]:
                return [a for a in n.addrs() if "p2p-circuit" in a]

            # Both ask at once; whichever the relay hears first holds the one reservation.
            holder = (
                await wait_until(
                    lambda: [n for n in (first, second) if circuits(n)], what="a reservation"
                )
            )[0]
            other = second if holder is first else first
            circuit = circuits(holder)
            # Only one reservation fits: once the relay has refused the other node's
            # request, that node has no relayed address.
            await wait_until(
                lambda: relay.relays.status()["service"]["refused"] >= 1,
                what="the relay refusing the second reservation",
            )
            assert not circuits(other)
            # No reservation, no circuit.
            fake = circuit[0].replace(holder.peer_id, other.peer_id)
            with pytest.raises(PeerUnreachable, match="NO_RESERVATION"):
                await caller.connect(fake)
            # The byte limit ends a circuit that carries too much.
            await caller.connect(circuit[0])
            holder.dataplane.post_recv(caller.peer_id, "big")
            with pytest.raises(Exception):  # noqa: B017 -- any failure: the circuit is cut
                await caller.dataplane.send(
                    holder.peer_id, "big", {"x": b"\0" * 1_000_000}, timeout=10
                )
            await wait_until(
                lambda: relay.relays.status()["service"]["circuits"] == 0, what="the circuit cut"
            )


async def test_a_new_public_ip_voids_older_answers(node_config: Callable[..., NodeConfig]) -> None:
    async with Node(node_config(autonat=False)) as node:
        reach = node.reachability
        old = Probe("h1", "/ip4/198.51.100.7/tcp/4001", True, "", "198.51.100.7:5", 1.0)
        lan = Probe("h2", "/ip4/10.0.0.2/tcp/4001", True, "", "10.0.0.2:6", 2.0)
        new = Probe("h3", "/ip4/203.0.113.9/tcp/4001", False, "timeout", "203.0.113.9:7", 3.0)
        reach._probes = {"h1": [old], "h2": [lan], "h3": [new]}
        reach._decide()
        assert set(reach._probes) == {"h2", "h3"}  # the LAN helper's view is not a network change
        assert reach.verdict.observed_ips[0] in ("203.0.113.9", "10.0.0.2")
        assert "203.0.113.9" in reach.external_ips() and "198.51.100.7" not in reach.external_ips()
