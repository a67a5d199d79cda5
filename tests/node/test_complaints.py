"""Peer-provoked log lines are rate limited per peer, and say how many were held back."""

from __future__ import annotations

import logging

from gossamer.node.complaints import MAX_PEERS, Complaints


def test_one_line_per_peer_per_interval_with_the_count_of_the_rest(caplog) -> None:
    now = [0.0]
    complaints = Complaints(interval=60.0, clock=lambda: now[0])
    log = logging.getLogger("gossamer.test.complaints")
    with caplog.at_level(logging.WARNING, logger="gossamer.test.complaints"):
        for _ in range(1000):
            complaints.log(log, "evil", "bad frame from %s", "evil")
        complaints.log(log, "other", "bad frame from %s", "other")  # another peer: its own line
        now[0] = 61.0
        complaints.log(log, "evil", "bad frame from %s", "evil")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "bad frame from evil",
        "bad frame from other",
        "bad frame from evil (and 999 more from this peer since)",
    ]
    assert complaints.total == 1002


def test_memory_is_bounded_by_the_number_of_peers_remembered() -> None:
    complaints = Complaints(clock=lambda: 0.0)
    for i in range(MAX_PEERS + 100):
        assert complaints.due(f"peer{i}") == 0
    assert len(complaints._last) == MAX_PEERS
    assert complaints.due("peer0") == 0  # forgotten first, so it is due again


def test_libp2p_repeats_reach_our_log_once_per_minute_first_line_only(caplog) -> None:
    from gossamer.node._libp2p_compat import route_libp2p_logging

    route_libp2p_logging()
    noisy = logging.getLogger("libp2p.host.basic_host")
    with caplog.at_level(logging.WARNING, logger="gossamer.libp2p"):
        for i in range(500):
            noisy.error("Failed to open stream to peer %s:\n  Error: protocol read failed", i)
        noisy.error("something else entirely")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gossamer.libp2p")]
    assert lines == ["Failed to open stream to peer 0:", "something else entirely"]


def test_a_peer_that_keeps_misbehaving_is_banned_for_longer_each_time() -> None:
    from gossamer.node.complaints import Misbehaviour

    now = [0.0]
    scores = Misbehaviour(ban_score=30, ban_seconds=10, half_life=60, clock=lambda: now[0])
    assert scores.record("evil", 10) is None and scores.record("evil", 10) is None
    assert scores.record("evil", 10) == 10  # banned for 10 s
    assert scores.banned("evil") and not scores.banned("honest")
    assert scores.record("evil", 100) is None  # already banned: no new ban
    now[0] = 11.0
    assert not scores.banned("evil")
    assert scores.record("evil", 30) == 20  # the second ban is twice as long
    # scores decay: an honest peer that trips a rule now and then never gets there
    for _ in range(100):
        now[0] += 120.0
        assert scores.record("honest", 10) is None
    assert Misbehaviour(ban_seconds=0, clock=lambda: 0.0).record("x", 1e9) is None  # off


def test_a_peer_chosen_text_cannot_forge_a_log_line(caplog) -> None:
    complaints = Complaints()
    with caplog.at_level(logging.WARNING):
        forged = "abc\n12:00:00 INFO forged\x1b[2J"
        complaints.log(logging.getLogger("t"), "p", "refused %s", forged)
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
    assert "abc\\x0a12:00:00 INFO forged\\x1b[2J" in record.getMessage()
