"""Per-peer budgets: a token bucket per peer and a cap on jobs in flight (no clock, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.node.budgets import InFlight, PeerBudget


def test_a_bucket_refuses_what_it_does_not_hold_and_refills_at_its_rate() -> None:
    now = [0.0]
    budget = PeerBudget(capacity=100, rate=10, clock=lambda: now[0])
    assert budget.take("a", 60) and budget.take("a", 40)
    assert not budget.take("a", 1)  # empty
    assert budget.take("b", 100)  # every peer has its own
    now[0] = 2.5
    assert budget.left("a") == pytest.approx(25)
    assert not budget.take("a", 30) and budget.left("a") == pytest.approx(25)  # nothing spent
    assert budget.take("a", 25)
    now[0] = 1000.0
    assert budget.left("a") == 100  # never above capacity


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 50)), max_size=60))
def test_what_a_peer_gets_is_bounded_by_capacity_plus_rate_times_time(steps) -> None:
    now = [0.0]
    budget = PeerBudget(capacity=100, rate=10, clock=lambda: now[0])
    granted = 0.0
    for wait, cost in steps:
        now[0] += wait
        if budget.take("p", cost):
            granted += cost
    assert granted <= 100 + 10 * now[0] + 1e-6


def test_peers_remembered_are_bounded() -> None:
    budget = PeerBudget(capacity=1, rate=0, clock=lambda: 0.0, max_peers=10)
    for i in range(100):
        assert budget.take(f"p{i}", 1)
    assert len(budget._buckets) == 10


def test_jobs_in_flight_are_capped_per_peer() -> None:
    flights = InFlight(2)
    assert flights.start("a") and flights.start("a") and not flights.start("a")
    assert flights.start("b")
    flights.end("a")
    assert flights.start("a") and flights.running("a") == 2
    for _ in range(3):
        flights.end("a")
    assert flights.running("a") == 0 and flights._running == {"b": 1}
