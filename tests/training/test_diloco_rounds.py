"""The round state machine: closing rules, run position, membership, parity, entering a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gossamer.training import rounds

A, B, C, D = "peerA", "peerB", "peerC", "peerD"


@dataclass(frozen=True)
class E:
    peer_id: str
    step: int
    status: str
    hash: Any = None
    recent: tuple = ()


def entries(*items: E) -> dict[str, E]:
    return {e.peer_id: e for e in items}


def test_policy_closes_at_h_or_early_only_after_min_steps():
    exact = rounds.RoundPolicy(inner_steps=10)
    assert not exact.should_close(9, 1e9, others_closed=True)  # everyone takes exactly H
    assert exact.should_close(10, 0.0, others_closed=False)
    flexible = rounds.RoundPolicy(inner_steps=10, min_inner_steps=2, round_seconds=5.0)
    assert not flexible.should_close(1, 100.0, others_closed=True)
    assert flexible.should_close(2, 0.0, others_closed=True)  # a faster member closed it
    assert not flexible.should_close(5, 4.9, others_closed=False)
    assert flexible.should_close(5, 5.0, others_closed=False)  # the time budget
    with pytest.raises(ValueError):
        rounds.RoundPolicy(inner_steps=10, min_inner_steps=11)
    with pytest.raises(ValueError):
        rounds.RoundPolicy(inner_steps=0)


def test_run_position_takes_the_most_held_round_and_its_majority_digest():
    es = entries(
        E(A, 4, "training", "d4"),
        E(B, 5, "training", "d5"),
        E(C, 5, "syncing", "d5"),
        E(D, 5, "training", "bad"),
    )
    pos = rounds.run_position(es)
    assert (pos.round, pos.digest, pos.holders, pos.finished) == (5, "d5", (B, C), False)
    # one member alone ahead of the others does not move the run
    ahead = entries(E(A, 9, "training", "x"), E(B, 5, "training", "d5"), E(C, 5, "syncing", "d5"))
    assert rounds.run_position(ahead).round == 5
    tie = entries(E(A, 6, "training", "d6"), E(B, 5, "syncing", "d5"))
    assert rounds.run_position(tie).round == 6
    # joined entries hold no state; dead members do not count
    es2 = entries(E(A, 7, "joined"), E(B, 5, "training", "d5"), E(C, 6, "training", "d6"))
    assert rounds.run_position(es2, live=lambda p: p != C).round == 5
    assert rounds.run_position({}).round is None
    done = rounds.run_position(entries(E(A, 9, "done", "d9"), E(B, 9, "done", "d9")))
    assert done.finished and done.round == 9


def test_majority_tie_goes_to_the_smallest_peer_ids_digest():
    verdict = rounds.parity(B, "x", {A: "y"})
    assert not verdict.ok and verdict.digest == "y" and verdict.holders == (A,)
    assert rounds.parity(A, "y", {B: "x"}).ok
    three = rounds.parity(C, "odd", {A: "d", B: "d"})
    assert not three.ok and three.dissent == (C,) and three.compared == 3
    alone = rounds.parity(A, "d", {})
    assert alone.ok and alone.compared == 1


def test_round_members_are_the_live_members_in_the_round():
    es = entries(
        E(A, 3, "training", "d"),
        E(B, 3, "syncing", "d"),
        E(C, 3, "training", "stale"),  # in the round (parity will judge its state)
        E(D, 3, "joined"),  # a newcomer that announced the round: waited for
        E("peerE", 2, "training", "d"),  # another round
        E("peerF", 3, "failed"),
    )
    assert rounds.round_members(es, 3, A) == [A, B, C, D]
    assert rounds.round_members(es, 3, A, live=lambda p: p != B) == [A, C, D]
    assert rounds.round_members(es, 4, D) == [D]
    assert rounds.others_closing(es, 3, A)
    assert not rounds.others_closing(es, 3, B)


def test_parity_waits_only_for_members_that_can_still_answer():
    es = entries(E(A, 4, "training", "d"), E(B, 3, "syncing", "c"), E(C, 3, "failed"))
    assert rounds.parity_pending(es, 4, [A, B, C]) == [B]
    assert rounds.parity_pending(es, 4, [A, B, C], live=lambda p: p != B) == []
    assert rounds.parity_digests(es, 4) == {A: "d"}
    # a member that moved on answers from its history; one that is behind does not
    later = entries(E(A, 4, "training", "d"), E(B, 5, "syncing", "e", ((3, "c"), (4, "d4"))))
    assert rounds.parity_digests(later, 4) == {A: "d", B: "d4"}
    assert rounds.parity_digests(later, 3) == {B: "c"}
    assert rounds.parity_digests(later, 2) == {}


def test_plan_entry():
    running = rounds.RunPosition(6, "d6", (A, B))
    # a newcomer waits for the next round instead of barging into an average in progress
    assert rounds.plan_entry(running, None, is_host=False, checkpoint_round=None).action == (
        "announce"
    )
    assert rounds.plan_entry(running, None, is_host=False, checkpoint_round=None).round == 7
    old = E(C, 4, "syncing", "d4")  # a member that restarted
    assert rounds.plan_entry(running, old, is_host=False, checkpoint_round=4).round == 7
    announced = E(C, 7, "joined")
    assert rounds.plan_entry(running, announced, is_host=False, checkpoint_round=None).action == (
        "wait"
    )
    nxt = rounds.RunPosition(7, "d7", (A, B))
    plan = rounds.plan_entry(nxt, announced, is_host=False, checkpoint_round=None)
    assert (plan.action, plan.round, plan.digest, plan.holders) == ("start", 7, "d7", (A, B))
    empty = rounds.RunPosition(None, None, ())
    assert rounds.plan_entry(empty, None, is_host=True, checkpoint_round=None).action == "gather"
    assert rounds.plan_entry(empty, None, is_host=False, checkpoint_round=3).action == "resume"
    assert rounds.plan_entry(empty, None, is_host=False, checkpoint_round=None).action == "wait"
    # overlapped rounds: two rounds ahead; the round in between passes without the newcomer
    ahead = rounds.plan_entry(running, None, is_host=False, checkpoint_round=None, lead=2)
    assert (ahead.action, ahead.round) == ("announce", 8)
    early = E(C, 8, "joined")
    assert rounds.plan_entry(nxt, early, is_host=False, checkpoint_round=None).action == "wait"
    assert rounds.round_members({A: E(A, 7, "training", "d7"), C: early}, 7, A) == [A]
    finished = rounds.RunPosition(10, "d10", (A,), finished=True)
    assert rounds.plan_entry(finished, None, is_host=False, checkpoint_round=None).action == (
        "finished"
    )
