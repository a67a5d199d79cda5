"""Helpers for the NAT-lab tests (fixtures live in conftest.py).

The engine is :mod:`gossamer.bench._natlab` (shared with ``gossamer bench nat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gossamer.bench._natlab import Agent, NatLab

# Lab timings: the defaults suit the internet; the lab's links answer in µs.
LAB_SETTINGS: dict[str, Any] = {
    "autonat_delay": 0.2,
    "autonat_retry": 2.0,
    "autonat_timeout": 2.0,
    "relay_check_interval": 2.0,
    "relay_reservations": 1,
    "holepunch_timeout": 2.0,
    "upnp": False,
    "dht": False,
}


def bootstrap_addr(agent: Agent) -> str:
    return f"/ip4/{agent.host.ip}/tcp/4001/p2p/{agent.peer_id}"


def circuit_addrs(status: dict[str, Any], relay: Agent | None = None) -> list[str]:
    return [
        a
        for a in status["addrs"]
        if "/p2p-circuit/" in a and (relay is None or f"/p2p/{relay.peer_id}/" in a)
    ]


def reachability(status: dict[str, Any]) -> str:
    return status["reachability"]["status"]


def punch_state(status: dict[str, Any], peer: Agent) -> dict[str, Any]:
    return status["nat"]["holepunch"].get(peer.peer_id[-8:], {})


@dataclass
class NatWorld:
    lab: NatLab
    pub1: Agent
    pub2: Agent
    a: Agent
    b: Agent
    s: Agent
