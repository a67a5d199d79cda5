"""What a peer may make the hole puncher do, without a network: which DCUtR streams are answered,
how many sessions per peer and in all (an injected clock), how many connects one session makes,
and which addresses are dialed at all (gossamer/node/holepunch.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.node.holepunch import (
    MAX_BUDGET_PEERS,
    REFUSALS,
    DialAllowance,
    PunchBudget,
    address_scope,
    dial_targets,
    responder_refusal,
    scopes_of,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("stream_kind", "kinds", "refusal"),
    [
        ("relayed", ["relayed"], None),  # an upgrade in progress
        ("relayed", ["relayed", "relayed"], None),
        ("direct", ["direct"], "not-relayed"),  # a direct peer asks us to dial for it
        ("direct", ["direct", "relayed"], "not-relayed"),
        ("relayed", ["relayed", "direct"], "direct"),  # nothing left to upgrade
        ("relayed", [], "not-relayed"),  # the connection went meanwhile
        ("direct", [], "not-relayed"),
    ],
)
def test_only_an_upgrade_in_progress_is_answered(stream_kind, kinds, refusal) -> None:
    assert responder_refusal(stream_kind, kinds) == refusal
    assert refusal is None or refusal in REFUSALS


def test_a_peer_gets_its_sessions_per_window_and_then_again() -> None:
    clock = Clock()
    budget = PunchBudget(per_peer=3, total=100, window=60.0, clock=clock)
    assert [budget.admit("p") for _ in range(3)] == [None, None, None]
    assert budget.admit("p") == "peer-budget"
    assert budget.admit("q") is None  # another peer has its own
    clock.now += 59.9
    assert budget.admit("p") == "peer-budget"
    assert budget.used("p") == 3
    clock.now += 0.1  # the first three leave the window together
    assert budget.used("p") == 0
    assert budget.admit("p") is None


def test_refused_sessions_do_not_count() -> None:
    clock = Clock()
    budget = PunchBudget(per_peer=1, total=100, window=60.0, clock=clock)
    assert budget.admit("p") is None
    for _ in range(50):
        clock.now += 1.0
        assert budget.admit("p") == "peer-budget"
    clock.now += 10.0  # 60 s after the one admitted session, however often it asked
    assert budget.admit("p") is None


def test_the_global_cap_holds_against_many_peer_ids() -> None:
    clock = Clock()
    budget = PunchBudget(per_peer=3, total=10, window=60.0, clock=clock)
    answers = [budget.admit(f"sybil{i}") for i in range(25)]
    assert answers[:10] == [None] * 10
    assert set(answers[10:]) == {"busy"}
    clock.now += 30.0
    assert budget.admit("honest") == "busy"
    clock.now += 30.0
    assert budget.admit("honest") is None


def test_a_peer_over_its_own_budget_is_told_so_first() -> None:
    budget = PunchBudget(per_peer=1, total=1, window=60.0, clock=Clock())
    assert budget.admit("p") is None
    assert budget.admit("p") == "peer-budget"
    assert budget.admit("q") == "busy"


def test_the_memory_is_bounded_by_the_admitted_sessions() -> None:
    clock = Clock()
    budget = PunchBudget(per_peer=3, total=50, window=60.0, clock=clock)
    for i in range(10_000):
        clock.now += 0.5
        budget.admit(f"peer{i}")
    assert len(budget._peers) <= 50 and len(budget._all) <= 50
    many = PunchBudget(per_peer=1, total=10**6, window=60.0, clock=clock)
    for i in range(MAX_BUDGET_PEERS + 10):
        many.admit(f"peer{i}")
    assert len(many._peers) <= MAX_BUDGET_PEERS


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.floats(0.0, 30.0)),
        max_size=200,
    ),
    st.integers(1, 4),
    st.integers(1, 8),
)
def test_no_window_ever_holds_more_than_the_caps(events, per_peer, total) -> None:
    """Against a brute-force count: in every window, admitted sessions stay under both caps."""
    clock = Clock()
    window = 60.0
    budget = PunchBudget(per_peer=per_peer, total=total, window=window, clock=clock)
    admitted: list[tuple[str, float]] = []
    for peer, step in events:
        clock.now += step
        if budget.admit(peer) is None:
            admitted.append((peer, clock.now))
        recent = [(p, t) for p, t in admitted if clock.now - t < window]
        assert len(recent) <= total
        assert sum(1 for p, _ in recent if p == peer) <= per_peer


def test_a_session_makes_a_bounded_number_of_connects() -> None:
    allowance = DialAllowance(5)
    assert [allowance.take() for _ in range(8)] == [True] * 5 + [False] * 3
    assert allowance.left == 0
    assert not DialAllowance(0).take()


@pytest.mark.parametrize(
    ("ip", "scope"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.0.2", "lan"),
        ("192.168.1.7", "lan"),
        ("fd00::1", "lan"),
        ("198.51.100.7", "public"),  # the NAT lab's internet
        ("8.8.8.8", "public"),
        ("0.0.0.0", None),
        ("::", None),
        ("224.0.0.1", None),  # multicast
        ("255.255.255.255", None),
        ("169.254.1.1", None),  # link-local
        ("fe80::1", None),
        ("240.0.0.1", None),  # reserved
        ("bogus", None),
    ],
)
def test_address_scopes(ip, scope) -> None:
    assert address_scope(ip) == scope


def test_dial_targets_keep_to_our_scopes() -> None:
    theirs = [
        "/ip4/198.51.100.34/tcp/4001",
        "/ip4/10.2.0.2/tcp/4001",
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/224.0.0.251/tcp/5353",
        "/ip4/169.254.3.4/tcp/1",
        "/ip4/198.51.100.18/tcp/4001",  # ours
        "/ip4/198.51.100.34/tcp/0",
    ]
    ours = {"198.51.100.18"}
    assert dial_targets(theirs, ours) == [("198.51.100.34", 4001), ("10.2.0.2", 4001)]
    assert dial_targets(theirs, ours, loopback=True, lan=False) == [
        ("198.51.100.34", 4001),
        ("127.0.0.1", 4001),
    ]
    # A peer cannot make us dial more than MAX_ADDRS addresses, however many it sends.
    flood = [f"/ip4/198.51.100.{i}/tcp/4001" for i in range(1, 200)]
    assert len(dial_targets(flood, ours)) == 8


def test_our_scopes() -> None:
    assert scopes_of({"127.0.0.1"}) == (True, False)  # loopback-only: no LAN to reach
    assert scopes_of({"0.0.0.0", "198.51.100.18"}) == (False, True)  # a wildcard may be on one
    assert scopes_of({"10.1.0.2", "198.51.100.18"}) == (False, True)
    assert scopes_of({"203.0.113.5"}) == (False, False)
