"""NAT traversal on real NATs (network namespaces + iptables): needs root, runs in CI.

One world for the module (see conftest.py): relays pub1/pub2, a and b behind
cone NATs, s behind a symmetric NAT.  The tests run in file order; the last one
kills pub1.
"""

from __future__ import annotations

import time

import pytest
from conftest import wait_until_sync

from natlab.natlab_helpers import NatWorld, circuit_addrs, punch_state, reachability

pytestmark = [pytest.mark.root, pytest.mark.slow]

MB = 1 << 20
RELAY_RECOVERY_BOUND_S = 15.0  # relay_check_interval is 2 s in the lab


def test_classification_and_cone_nat_hole_punch_carries_rpc_and_64mb_direct(
    nat_world: NatWorld,
) -> None:
    w = nat_world
    # Each private node is private, the relay public -- with dial-back evidence.
    for agent in (w.a, w.b):
        status = agent.wait_for(lambda s: reachability(s) != "unknown", 30, what="a verdict")
        assert reachability(status) == "private", status["reachability"]
        evidence = " ".join(status["reachability"]["evidence"])
        assert f"to /ip4/{agent.host.wan_ip}/tcp/4001 failed" in evidence
    status = w.pub1.wait_for(lambda s: reachability(s) == "public", 30, what="public")
    assert f"/ip4/{w.pub1.host.ip}/tcp/4001 succeeded" in " ".join(
        status["reachability"]["evidence"]
    )
    assert status["nat"]["relay"]["service"]["enabled"]
    assert not status["torch_loaded"]  # a relay never imports torch

    # a keeps a reservation on a relay and advertises the relayed address.
    a_status = w.a.wait_for(lambda s: circuit_addrs(s), 20, what="a relayed address")
    circuits_before = w.pub1.call("status")["nat"]["relay"]["service"]["circuits_total"]

    # b reaches a through the relay, then both punch a hole.
    w.b.call("connect", addr=circuit_addrs(a_status, w.pub1)[0])
    b_status = w.b.wait_for(
        lambda s: punch_state(s, w.a).get("state") == "direct", 20, what="direct a<->b"
    )
    assert punch_state(b_status, w.a)["upgrade_ms"] is not None
    a_state = punch_state(w.a.call("status"), w.b)
    assert {a_state["role"], punch_state(b_status, w.a)["role"]} == {"initiator", "responder"}
    assert w.pub1.call("status")["nat"]["relay"]["service"]["circuits_total"] > circuits_before

    # The relayed connection is closed after the grace period; only direct remains.
    w.b.wait_for(
        lambda s: [c["kind"] for c in s["connections"].get(w.a.peer_id, [])] == ["direct"],
        15,
        what="relayed connection closed",
    )

    # An RPC on the direct path.
    ping = w.b.call("ping", peer_id=w.a.peer_id)
    assert [p["kind"] for p in ping["paths"]] == ["direct"]
    assert ping["paths"][0]["remote"] == f"{w.a.host.wan_ip}:4001"

    # 64 MB through the data plane: a's own data socket is behind its NAT, so
    # the data rides a libp2p stream -- on the direct connection, not the relay.
    relayed_before = w.pub1.call("status")["nat"]["relay"]["service"]["bytes_relayed"]
    receiving = w.a.start_call("recv", peer_id=w.b.peer_id, tag="t64", timeout=150)
    sent = w.b.call("send", peer_id=w.a.peer_id, nbytes=64 * MB, tag="t64", timeout=150)
    received = receiving.result(150)
    assert sent["nbytes"] == received["nbytes"] == 64 * MB
    assert sent["sha256"] == received["sha256"]
    assert sent["path"] == received["path"] == "libp2p"  # not "relay"
    assert [p["kind"] for p in sent["paths"]] == ["direct"]
    relayed_after = w.pub1.call("status")["nat"]["relay"]["service"]["bytes_relayed"]
    assert relayed_after - relayed_before < 1 * MB  # the relay did not carry it
    assert not any(x.call("status")["torch_loaded"] for x in (w.pub1, w.a, w.b))


def test_symmetric_nat_stays_reachable_through_the_relay(nat_world: NatWorld) -> None:
    w = nat_world
    s_status = w.s.wait_for(lambda s: circuit_addrs(s), 30, what="s relayed address")
    assert reachability(s_status) == "private"
    w.b.call("connect", addr=circuit_addrs(s_status)[0])

    # The RPC works on the relay while hole punching is tried and fails.
    ping = w.b.call("ping", peer_id=w.s.peer_id)
    assert [p["kind"] for p in ping["paths"]] == ["relayed"]

    config_attempts = 3
    s_status = w.s.wait_for(
        lambda s: (
            punch_state(s, w.b).get("state") == "failed"
            and punch_state(s, w.b).get("attempts", 0) >= config_attempts
        ),
        40,
        what="hole punch given up",
    )
    state = punch_state(s_status, w.b)
    assert state["state"] == "failed"
    assert "no direct connection" in state["reason"]  # the node says why
    assert "traffic stays on the relay" in w.s.log_tail(60)

    ping = w.b.call("ping", peer_id=w.s.peer_id)
    assert [p["kind"] for p in ping["paths"]] == ["relayed"]
    receiving = w.s.start_call("recv", peer_id=w.b.peer_id, tag="small", timeout=60)
    sent = w.b.call("send", peer_id=w.s.peer_id, nbytes=1 * MB, tag="small", timeout=60)
    received = receiving.result(60)
    assert sent["path"] == received["path"] == "relay"
    assert sent["sha256"] == received["sha256"]


def test_private_nodes_move_to_another_relay_when_theirs_dies(nat_world: NatWorld) -> None:
    w = nat_world
    for agent in (w.a, w.s):
        agent.wait_for(lambda s: circuit_addrs(s, w.pub1), 30, what="reservation on pub1")
    # pub2 is public too, so it could relay (the private nodes learn of it from pub1).
    w.pub2.wait_for(lambda s: s["nat"]["relay"]["service"]["enabled"], 20, what="pub2 relays")

    killed_at = time.monotonic()
    w.pub1.kill()
    statuses = {}
    for agent in (w.a, w.s):
        statuses[agent.name] = agent.wait_for(
            lambda s: circuit_addrs(s, w.pub2) and not circuit_addrs(s, w.pub1),
            RELAY_RECOVERY_BOUND_S,
            what="reservation on pub2",
        )
    recovered_s = time.monotonic() - killed_at
    assert recovered_s < RELAY_RECOVERY_BOUND_S

    # a is reachable again: s (which cannot hole-punch) finds a's new relayed
    # address in a's peer record in the DHT, dials it, and calls a.
    def relayed_by_pub2() -> list[str]:
        published = w.s.call("peer_record", peer_id=w.a.peer_id)
        return [x for x in published if f"/p2p/{w.pub2.peer_id}/p2p-circuit/" in x]

    new_addr = wait_until_sync(
        relayed_by_pub2, 20, interval=0.5, what="a's peer record with its pub2 circuit"
    )[0]
    assert new_addr in circuit_addrs(statuses["a"], w.pub2)
    assert w.s.call("connect", addr=new_addr) == w.a.peer_id
    ping = w.s.call("ping", peer_id=w.a.peer_id)
    assert "relayed" in [p["kind"] for p in ping["paths"]]
    events = " ".join(statuses["a"]["nat"]["relay"]["events"])
    assert "lost relay" in events and "reserved relay" in events
