"""The mesh policy (gossamer.crdt.mesh.MeshPolicy): which links a run closes, whom it
dials and when it runs anti-entropy, as a pure function of a snapshot and ``now``.

Table tests for each rule, properties over random meshes (checked against the
rules as they were written before the policy was pulled out of ``Mesh``), and
the ``Mesh`` shell driven by fake clocks instead of the wall clock.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.crdt import Member, SyncOptions
from gossamer.crdt.mesh import Mesh, MeshPolicy

ME = "m"  # peer ids compare as strings: "a" < ME < "z"


@dataclass(eq=False)
class FakeLink:
    """A link as the policy sees it; ``name`` identifies it across copies."""

    name: str
    initiator: bool
    opened: float
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def policy(**options: Any) -> MeshPolicy:
    return MeshPolicy(SyncOptions(**options))


def names(links: Sequence[FakeLink]) -> list[str]:
    return [link.name for link in links]


def linked(links: Mapping[str, Sequence[FakeLink]], closing: Sequence[FakeLink] = ()) -> set[str]:
    gone = {id(link) for link in closing}
    return {p for p, ls in links.items() if any(not lk.closed and id(lk) not in gone for lk in ls)}


# ------------------------------------------------------------------ duplicates


@pytest.mark.parametrize(
    ("peer", "links", "closed"),
    [
        # me < peer: keep the link we dialed
        ("z", [("in", False, 0.0), ("out", True, 0.0)], ["in"]),
        # me > peer: keep the link they dialed
        ("a", [("in", False, 0.0), ("out", True, 0.0)], ["out"]),
        # neither side's rule matches (both ours): keep the first
        ("a", [("out1", True, 0.0), ("out2", True, 0.0)], ["out2"]),
        # a duplicate still inside its grace second stays
        ("z", [("in", False, 9.5), ("out", True, 0.0)], []),
        # exactly one second old: not yet
        ("z", [("in", False, 9.0), ("out", True, 0.0)], []),
        # one link only: nothing to do
        ("z", [("in", False, 0.0)], []),
    ],
)
def test_duplicate_links_keep_the_one_the_smaller_id_dialed(
    peer: str, links: list[tuple[str, bool, float]], closed: list[str]
) -> None:
    snapshot = {peer: [FakeLink(n, init, opened) for n, init, opened in links]}
    closing = policy().links_to_close(ME, snapshot, set(), 10.0, random.Random(0))
    assert names(closing) == closed


def test_closed_links_are_not_duplicates() -> None:
    snapshot = {"z": [FakeLink("in", False, 0.0), FakeLink("out", True, 0.0, closed=True)]}
    assert policy().links_to_close(ME, snapshot, set(), 10.0, random.Random(0)) == []


# ------------------------------------------------------------------- trimming


def mesh_of(
    count: int, *, initiator: bool = True, opened: float = 0.0
) -> dict[str, list[FakeLink]]:
    return {f"p{i:02}": [FakeLink(f"p{i:02}", initiator, opened)] for i in range(count)}


@pytest.mark.parametrize(
    ("count", "mesh_high", "bootstrap", "initiator", "opened", "expected"),
    [
        (8, 8, set(), True, 0.0, 0),  # at mesh_high: keep all
        (10, 8, set(), True, 0.0, 2),  # two over: close two
        (10, 8, {"p00", "p01", "p02", "p03", "p04", "p05", "p06", "p07", "p08"}, True, 0.0, 1),
        (10, 8, set(), False, 0.0, 0),  # they dialed us: not ours to trim
        (10, 8, set(), True, 5.5, 0),  # younger than five seconds
        (10, 8, set(), True, 4.9, 2),  # just over five seconds old
    ],
)
def test_surplus_links_above_mesh_high_are_trimmed(
    count: int, mesh_high: int, bootstrap: set[str], initiator: bool, opened: float, expected: int
) -> None:
    snapshot = mesh_of(count, initiator=initiator, opened=opened)
    closing = policy(mesh_high=mesh_high).links_to_close(
        ME, snapshot, bootstrap, 10.5, random.Random(3)
    )
    assert len(closing) == expected
    assert not set(names(closing)) & bootstrap


def test_trimming_counts_a_peer_once_and_closes_the_link_that_survived_its_duplicate() -> None:
    # "z" has two links; the duplicate goes, and the one we dialed is what a trim may close.
    snapshot = mesh_of(2)
    snapshot["z"] = [FakeLink("z-in", False, 0.0), FakeLink("z-out", True, 0.0)]
    closing = policy(mesh_high=2).links_to_close(
        ME, snapshot, {"p00", "p01"}, 10.0, random.Random(0)
    )
    assert names(closing) == ["z-in", "z-out"]


# -------------------------------------------------------------------- dialing


@pytest.mark.parametrize(
    ("linked_count", "dialing", "mesh_low", "expected"),
    [(0, 0, 4, 4), (3, 0, 4, 1), (2, 2, 4, 0), (6, 0, 4, -2)],
)
def test_dials_wanted_tops_up_to_mesh_low(
    linked_count: int, dialing: int, mesh_low: int, expected: int
) -> None:
    assert policy(mesh_low=mesh_low).dials_wanted(linked_count, dialing) == expected


def test_peers_to_dial_skips_linked_dialing_and_recently_failed_peers() -> None:
    rule = policy(dial_backoff=5.0)
    candidates = ["a", "b", "c", "d", "e", "f"]
    failed = {"d": 96.0, "e": 94.9, "f": 160.0}  # f: refused, with its penalty
    dials = rule.peers_to_dial(candidates, {"a"}, {"b"}, failed, 100.0, 10, random.Random(1))
    assert sorted(dials) == ["c", "e"]


def test_peers_to_dial_takes_at_most_want_and_none_when_not_wanted() -> None:
    rule = policy()
    candidates = [f"p{i}" for i in range(10)]
    assert len(rule.peers_to_dial(candidates, set(), set(), {}, 0.0, 3, random.Random(1))) == 3
    rng = random.Random(1)
    state = rng.getstate()
    assert rule.peers_to_dial(candidates, set(), set(), {}, 0.0, 0, rng) == []
    assert rng.getstate() == state  # no dial wanted: no random draw either


def test_a_refused_dial_waits_a_minute_a_failed_one_only_the_backoff() -> None:
    rule = policy()
    assert rule.dial_penalty(refused=True) == 60.0
    assert rule.dial_penalty(refused=False) == 0.0


@pytest.mark.parametrize(("linked_count", "room"), [(0, True), (7, True), (8, False), (9, False)])
def test_a_connecting_member_gets_a_link_below_mesh_high(linked_count: int, room: bool) -> None:
    assert policy(mesh_high=8).has_room(linked_count) is room


# ------------------------------------------------------- anti-entropy, members


def test_anti_entropy_is_due_at_its_time_and_never_when_disabled() -> None:
    assert policy(anti_entropy_interval=10.0).anti_entropy_due(12.0, 12.0)
    assert not policy(anti_entropy_interval=10.0).anti_entropy_due(11.9, 12.0)
    assert not policy(anti_entropy_interval=0).anti_entropy_due(1e9, 0.0)


@given(st.floats(0, 1e6), st.integers(0, 2**32))
def test_the_next_anti_entropy_round_is_an_interval_away_give_or_take_a_fifth(
    now: float, seed: int
) -> None:
    at = policy(anti_entropy_interval=10.0).next_anti_entropy(now, random.Random(seed))
    assert now + 8.0 <= at <= now + 12.0


@pytest.mark.parametrize(
    ("heartbeat", "live"), [(None, True), (1000.0, True), (701.0, True), (700.0, False)]
)
def test_members_silent_for_stale_member_s_are_not_sync_candidates(
    heartbeat: float | None, live: bool
) -> None:
    assert policy(stale_member_s=300.0).is_live(heartbeat, 1000.0) is live


@pytest.mark.parametrize(
    ("have", "asked_at", "now", "pull"),
    [(5, None, 0.0, False), (2, None, 0.0, True), (2, 10.0, 14.9, False), (2, 10.0, 15.0, True)],
)
def test_a_pull_is_asked_once_per_pull_timeout(
    have: int, asked_at: float | None, now: float, pull: bool
) -> None:
    assert policy(pull_timeout=5.0).should_pull(have, 5, asked_at, now) is pull


# ------------------------------------------------------------------ properties


def reference_closes(
    me: str,
    links: dict[str, list[FakeLink]],
    bootstrap: set[str],
    now: float,
    mesh_high: int,
    rng: random.Random,
) -> list[FakeLink]:
    """``Mesh._close_duplicate_links`` then ``Mesh._trim_mesh`` as they read before the
    policy was pulled out (closing the links as they go)."""
    closed: list[FakeLink] = []
    for peer, peer_links in list(links.items()):
        live = [lk for lk in peer_links if not lk.closed]
        if len(live) < 2:
            continue
        keep_initiated = me < peer
        keep = next((lk for lk in live if lk.initiator == keep_initiated), live[0])
        for link in live:
            if link is not keep and now - link.opened > 1.0:
                link.close()
                closed.append(link)

    def linked_peers() -> list[str]:
        return [p for p, ls in links.items() if any(not lk.closed for lk in ls)]

    def link_for(peer: str) -> FakeLink | None:
        return next((lk for lk in links.get(peer, ()) if not lk.closed), None)

    surplus = len(linked_peers()) - mesh_high
    if surplus > 0:
        ours = [
            link
            for peer in linked_peers()
            if peer not in bootstrap
            and (link := link_for(peer)) is not None
            and link.initiator
            and now - link.opened > 5.0
        ]
        for link in rng.sample(ours, min(surplus, len(ours))):
            link.close()
            closed.append(link)
    return closed


def reference_dials(
    candidates: list[str],
    linked_peers: set[str],
    dialing: set[str],
    failed: dict[str, float],
    now: float,
    want: int,
    backoff: float,
    rng: random.Random,
) -> list[str]:
    """The dialing half of ``Mesh.maintain`` as it read before the policy."""
    fresh = [
        p
        for p in candidates
        if p not in linked_peers and p not in dialing and now - failed.get(p, -1e9) >= backoff
    ]
    rng.shuffle(fresh)
    return fresh[:want]


PEERS = [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) != ME]


@st.composite
def meshes(draw: Callable[..., Any]) -> dict[str, list[FakeLink]]:
    peers = draw(st.lists(st.sampled_from(PEERS), unique=True, max_size=14))
    out: dict[str, list[FakeLink]] = {}
    for peer in peers:
        count = draw(st.integers(0, 3))
        out[peer] = [
            FakeLink(
                f"{peer}{i}",
                draw(st.booleans()),
                draw(st.sampled_from([0.0, 3.0, 8.9, 9.0, 9.5, 10.0])),
                draw(st.booleans()) and draw(st.booleans()),  # mostly open
            )
            for i in range(count)
        ]
    return out


@settings(max_examples=300, deadline=None)
@given(
    meshes(),
    st.data(),
    st.integers(0, 12),
    st.sampled_from([4.0, 9.5, 10.0, 14.0, 15.1]),
    st.integers(0, 2**32),
)
def test_closing_matches_the_old_rules_and_keeps_every_needed_link(
    links: dict[str, list[FakeLink]], data: st.DataObject, mesh_high: int, now: float, seed: int
) -> None:
    bootstrap = set(data.draw(st.lists(st.sampled_from(PEERS), max_size=6)))
    before = copy.deepcopy(links)
    rule = policy(mesh_high=mesh_high)
    closing = rule.links_to_close(ME, links, bootstrap, now, random.Random(seed))

    assert names(closing) == names(
        reference_closes(ME, copy.deepcopy(links), bootstrap, now, mesh_high, random.Random(seed))
    )
    # It only answers: the snapshot is as it was (closing is the caller's job).
    assert {p: [vars(lk) for lk in ls] for p, ls in links.items()} == {
        p: [vars(lk) for lk in ls] for p, ls in before.items()
    }
    # Deterministic: the same snapshot and seed give the same answer.
    again = rule.links_to_close(ME, links, bootstrap, now, random.Random(seed))
    assert names(again) == names(closing)

    after = linked(links, closing)
    # A peer keeps its last link unless it is surplus we dialed; bootstrap peers always do.
    for peer in linked(links) - after:
        assert peer not in bootstrap
        live = [lk for lk in links[peer] if not lk.closed]
        assert any(lk.initiator and now - lk.opened > 5.0 for lk in live)
    # Trimming never goes below mesh_high, and stops once there.
    assert len(after) >= min(len(linked(links)), mesh_high)
    trimmed = len(linked(links)) - len(after)
    assert trimmed <= max(0, len(linked(links)) - mesh_high)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(PEERS), unique=True, max_size=20),
    st.data(),
    st.integers(0, 10),
    st.integers(0, 2**32),
)
def test_dialing_matches_the_old_rules_and_never_overshoots_mesh_low(
    candidates: list[str], data: st.DataObject, mesh_low: int, seed: int
) -> None:
    linked_peers = set(data.draw(st.lists(st.sampled_from(PEERS), max_size=8)))
    dialing = set(data.draw(st.lists(st.sampled_from(PEERS), max_size=4)))
    failed = data.draw(
        st.dictionaries(st.sampled_from(PEERS), st.sampled_from([0.0, 95.0, 96.0, 160.0]))
    )
    rule = policy(mesh_low=mesh_low, dial_backoff=5.0)
    want = rule.dials_wanted(len(linked_peers), len(dialing))
    dials = rule.peers_to_dial(
        sorted(candidates), linked_peers, dialing, failed, 100.0, want, random.Random(seed)
    )
    if want > 0:
        assert dials == reference_dials(
            sorted(candidates),
            linked_peers,
            dialing,
            failed,
            100.0,
            want,
            5.0,
            random.Random(seed),
        )
    assert len(set(dials)) == len(dials)
    assert set(dials) <= set(candidates) - linked_peers - dialing
    assert all(100.0 - failed.get(p, -1e9) >= 5.0 for p in dials)
    total = len(linked_peers) + len(dialing)
    assert total + len(dials) <= max(mesh_low, total)
    assert dials == rule.peers_to_dial(
        sorted(candidates), linked_peers, dialing, failed, 100.0, want, random.Random(seed)
    )


# ------------------------------------------------- the Mesh shell, fake clocks


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StubRun:
    """The parts of a Run the mesh reads, with fake clocks and a recording nursery."""

    def __init__(self, options: SyncOptions, members: dict[str, Member] | None = None) -> None:
        self.options = options
        self.clock = FakeClock(1_000_000.0)  # unix time
        self.monotonic = FakeClock(0.0)
        self.links: dict[str, list[FakeLink]] = {}
        self.bootstrap_peers: set[str] = set()
        self.started: list[Any] = []
        self.nursery = SimpleNamespace(start_soon=lambda fn, *args: self.started.append(fn))
        self.node = SimpleNamespace(peer_id=ME)
        self.doc = SimpleNamespace(members=lambda: dict(members or {}), member=lambda p: None)
        self.service = SimpleNamespace(may_talk=lambda p: True)
        self.charter = SimpleNamespace(may_join=lambda p: True)

    def linked_peers(self) -> list[str]:
        return [p for p, ls in self.links.items() if any(not lk.closed for lk in ls)]


def quiet_options(**overrides: Any) -> SyncOptions:
    values: dict[str, Any] = {"mesh_low": 0, "anti_entropy_interval": 0}
    values.update(overrides)
    return SyncOptions(**values)


def test_mesh_closes_a_duplicate_once_the_runs_monotonic_clock_passes_its_grace() -> None:
    run = StubRun(quiet_options())
    mesh = Mesh(run)  # type: ignore[arg-type]
    run.links["z"] = [FakeLink("in", False, 0.0), FakeLink("out", True, 0.0)]
    run.monotonic.now = 1.0
    mesh.maintain(run.monotonic())
    assert not run.links["z"][0].closed
    run.monotonic.now = 1.001
    mesh.maintain(run.monotonic())
    assert run.links["z"][0].closed and not run.links["z"][1].closed


def test_mesh_drops_stale_members_by_the_runs_wall_clock() -> None:
    now = 1_000_000.0
    members = {"a": Member("a", heartbeat=now - 10), "b": Member("b"), ME: Member(ME)}
    run = StubRun(quiet_options(stale_member_s=300.0), members)
    mesh = Mesh(run)  # type: ignore[arg-type]
    assert mesh.candidates() == ["a", "b"]
    run.clock.now = now + 289.9
    assert mesh.candidates() == ["a", "b"]
    run.clock.now = now + 290.0
    assert mesh.candidates() == ["b"]


def test_mesh_starts_anti_entropy_when_the_monotonic_clock_reaches_its_round() -> None:
    run = StubRun(quiet_options(anti_entropy_interval=10.0))
    mesh = Mesh(run)  # type: ignore[arg-type]
    run.monotonic.now = 7.99
    mesh.maintain(run.monotonic())
    assert run.started == []
    run.monotonic.now = 12.0
    mesh.maintain(run.monotonic())
    assert run.started == [mesh.anti_entropy_once]
    mesh.maintain(run.monotonic())  # the next round is 8-12 s later, not now
    assert run.started == [mesh.anti_entropy_once]


def test_mesh_dials_up_to_mesh_low_skipping_recent_failures() -> None:
    members = {p: Member(p) for p in "abcde"}
    run = StubRun(quiet_options(mesh_low=3, dial_backoff=5.0), members)
    mesh = Mesh(run)  # type: ignore[arg-type]
    run.links["a"] = [FakeLink("a", True, 0.0)]
    mesh._dial_failed["b"] = 98.0
    run.monotonic.now = 100.0
    mesh.maintain(run.monotonic())
    assert len(run.started) == 2
    assert mesh._dialing <= {"c", "d", "e"} and len(mesh._dialing) == 2
