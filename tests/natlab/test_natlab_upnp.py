"""UPnP in the NAT lab: the router runs a UPnP gateway (gossamer.bench._natlab_igd)
that installs real iptables port forwards; the node behind it maps its port,
has the mapping verified by a dial-back, and only then advertises it."""

from __future__ import annotations

import pytest

from gossamer.bench._natlab import NatLab
from natlab.natlab_helpers import LAB_SETTINGS, bootstrap_addr, reachability

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_upnp_mapping_is_verified_then_advertised(natlab: NatLab) -> None:
    natlab.add_public("pub1")
    natlab.add_nat("natu", "cone", private="u")
    natlab.start_igd("natu")
    pub1 = natlab.start_node("pub1", LAB_SETTINGS).wait_ready()
    settings = {**LAB_SETTINGS, "upnp": True, "upnp_timeout": 2.0}
    u = natlab.start_node("u", {**settings, "bootstrap": [bootstrap_addr(pub1)]}).wait_ready()
    mapped = f"/ip4/{u.host.wan_ip}/tcp/4001"

    status = u.wait_for(lambda s: reachability(s) == "public", 30, what="public through UPnP")
    assert status["nat"]["upnp"] == {
        "state": "mapped",
        "mapped": mapped,
        "verified": True,
        "error": "",
    }
    assert mapped in status["reachability"]["confirmed_addrs"]
    assert f"to {mapped} succeeded" in " ".join(status["reachability"]["evidence"])
    assert f"{mapped}/p2p/{u.peer_id}" in status["addrs"]
    # Public now: no relay reservation needed, and it offers to relay itself.
    assert not [a for a in status["addrs"] if "/p2p-circuit/" in a]
    assert status["nat"]["relay"]["service"]["enabled"]
    # The forward is real: the router's NAT table holds it.
    assert f"--to-destination {u.host.ip}:4001" in natlab.sh("iptables -t nat -S", ns="natu")
