"""Standing: veterans and back-off for members that keep missing rounds."""

from gossamer.training.standing import Standing


def test_a_peer_that_never_contributes_is_skipped_with_growing_back_off():
    standing = Standing()
    honest = ["a", "b", "c"]
    candidates_paid = 0
    for r in range(40):
        candidates = [*honest, *(["sybil"] if not standing.skipped("sybil", r) else [])]
        candidates_paid += "sybil" in candidates
        standing.record(r, candidates, honest)
    # it cost a join deadline in a handful of the 40 rounds (1 forgiven, then 2, 4, 8, … skipped)
    assert 3 <= candidates_paid <= 6
    assert not standing.is_veteran("sybil")
    assert all(standing.is_veteran(p) for p in honest)


def test_one_missed_round_is_forgiven_and_contributing_clears_the_record():
    standing = Standing()
    standing.record(0, ["a", "b", "c"], ["a", "b"])  # c missed once
    assert not standing.skipped("c", 1)
    standing.record(1, ["a", "b", "c"], ["a", "b"])  # twice in a row: skipped two rounds
    assert standing.skipped("c", 2) and standing.skipped("c", 3) and not standing.skipped("c", 4)
    standing.record(4, ["a", "b", "c"], ["a", "b", "c"])
    assert standing.misses.get("c") is None and not standing.skipped("c", 5)
    assert standing.is_veteran("c")


def test_an_owner_that_keeps_accusing_alone_is_backed_off_and_chance_is_forgiven():
    standing = Standing()
    members = ["a", "b", "c", "d"]
    for r in range(3):
        standing.record(r, members, members)
        standing.record_lone_exclusions(r, ["d"])  # d left someone out, alone, three rounds
    assert standing.skipped("d", 3) and standing.skipped("d", 4)
    assert standing.is_veteran("d")  # it did contribute: its word just stops costing rounds
    late = Standing()
    for r in range(0, 40, 4):  # once every 4 rounds: what a late piece does by chance
        late.record_lone_exclusions(r, ["b"])
    assert not any(late.skipped("b", r) for r in range(41))
