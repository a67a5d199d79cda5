"""The hole puncher's decisions, without a network: who initiates, when, and what an attempt's
outcome means (gossamer/node/holepunch.py, the pure functions above ``HolePuncher``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.node.holepunch import (
    PunchState,
    after_attempt,
    dialer_initiates,
    on_connection,
    responder_failure,
    retry_delay,
    starts_afresh,
)

KINDS = st.lists(st.sampled_from(["direct", "relayed"]), max_size=3)


def _state(state: str = "relayed", relayed_at: float | None = 1.0, role: str = "") -> PunchState:
    return PunchState("peer", state=state, relayed_at=relayed_at, role=role)


@pytest.mark.parametrize(
    ("kinds", "known", "meaning"),
    [
        ([], None, "nothing"),
        (["relayed"], None, "relayed"),
        (["relayed", "relayed"], _state(), "relayed"),
        (["direct"], None, "nothing"),  # never relayed: nothing to upgrade
        (["direct"], _state(relayed_at=None), "nothing"),
        (["direct"], _state(state="direct"), "nothing"),  # already counted
        (["direct"], _state(state="punching"), "upgraded"),
        (["direct", "relayed"], _state(state="failed"), "upgraded"),  # it came direct after all
    ],
)
def test_what_a_new_connection_means(kinds, known, meaning) -> None:
    assert on_connection(kinds, known) == meaning


@given(KINDS, st.sampled_from(["relayed", "punching", "direct", "failed"]))
def test_a_direct_connection_is_never_punched(kinds, state) -> None:
    if "direct" in kinds:
        assert on_connection(kinds, _state(state)) in ("upgraded", "nothing")
        assert not dialer_initiates(kinds, "", False)
        assert after_attempt(False, kinds) == "direct"


def test_a_concluded_punch_starts_a_fresh_count() -> None:
    assert starts_afresh(_state(relayed_at=None))
    assert starts_afresh(_state(state="direct")) and starts_afresh(_state(state="failed"))
    assert not starts_afresh(_state(state="punching"))
    assert not starts_afresh(_state(state="relayed"))


@pytest.mark.parametrize(
    ("kinds", "role", "responding", "initiates"),
    [
        (["relayed"], "", False, True),  # the accepting side did not start: we do
        (["relayed"], "responder", False, False),  # it started: it drives the retries
        (["relayed"], "", True, False),  # its session is running right now
        ([], "", False, False),  # the relayed connection went
        (["relayed", "direct"], "", False, False),  # already direct
    ],
)
def test_the_dialing_side_initiates_only_when_the_accepting_side_did_not(
    kinds, role, responding, initiates
) -> None:
    assert dialer_initiates(kinds, role, responding) is initiates


@pytest.mark.parametrize(
    ("ok", "kinds", "outcome"),
    [
        (True, ["relayed"], "direct"),
        (False, ["direct", "relayed"], "direct"),  # the peer's dial won the race
        (False, ["relayed"], "retry"),
        (False, [], "closed"),
    ],
)
def test_what_an_attempt_means(ok, kinds, outcome) -> None:
    assert after_attempt(ok, kinds) == outcome


def test_retries_back_off_exponentially_and_say_why_they_failed() -> None:
    assert [retry_delay(a) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert responder_failure([]) == "peer sent no address we could dial"
    assert "203.0.113.5:4001" in responder_failure([("203.0.113.5", 4001)])
