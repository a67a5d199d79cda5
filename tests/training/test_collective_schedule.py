"""The all-reduce's pure parts: the schedule and tag grammar, and the membership rules."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.training.collective_membership import (
    AGREEMENT_ROUNDS,
    Decision,
    MembershipAgreement,
    Status,
    decide,
)
from gossamer.training.collective_plan import BLOCK, Plan
from gossamer.training.collective_schedule import (
    JOIN,
    AllReduceSchedule,
    Tag,
    Transfer,
    scope_prefix,
)

peer_ids = st.text(alphabet="abcdefgh123", min_size=1, max_size=6)
member_sets = st.lists(peer_ids, min_size=1, max_size=6, unique=True)
keys = st.text(max_size=12)  # any text, slashes included: run keys look like "diloco/run/r3"
attempts = st.integers(min_value=0, max_value=20)
numels = st.integers(min_value=0, max_value=6000)
piece_sizes = st.integers(min_value=1, max_value=6).map(lambda n: n * BLOCK)


def schedules(
    key: str, attempt: int, members: list[str], numel: int, piece_elems: int
) -> dict[str, AllReduceSchedule]:
    return {
        me: AllReduceSchedule.build(key, attempt, members, me, numel, piece_elems) for me in members
    }


# --- the tag grammar ------------------------------------------------------------------------


def test_tags_are_todays_wire_tags():
    # the strings the collective used before the grammar had a module of its own
    assert str(Tag.contribution("diloco/run/r3", 0, 2, 5)) == "ar/diloco/run/r3/0/rs/2/5"
    assert str(Tag.reduced("k", 3, 0, 1)) == "ar/k/3/ag/0/1"
    assert str(Tag.status("k", 1)) == "ar/k/1/st"
    assert str(Tag.view("k", JOIN, 0)) == "ar/k/join/mv/0"
    assert str(Tag.view("k", 2, 1)) == "ar/k/2/mv/1"
    assert scope_prefix("k", JOIN) == "ar/k/join/"
    assert scope_prefix("barrier/end", 4) == "ar/barrier/end/4/"


tags = st.one_of(
    st.builds(Tag.contribution, keys, attempts, st.integers(0, 99), st.integers(0, 99)),
    st.builds(Tag.reduced, keys, attempts, st.integers(0, 99), st.integers(0, 99)),
    st.builds(Tag.status, keys, attempts),
    st.builds(Tag.view, keys, st.one_of(st.just(JOIN), attempts), st.integers(0, 3)),
)


@given(tags)
def test_tag_parse_inverts_format(tag):
    text = str(tag)
    assert Tag.parse(text) == tag
    assert text.startswith(scope_prefix(tag.key, tag.scope))


@given(st.text(alphabet="ar/01-stmvgjoink", max_size=24))
def test_parse_accepts_only_canonical_tags(text):
    try:
        tag = Tag.parse(text)
    except ValueError:
        return
    assert str(tag) == text  # whatever parses is exactly what format writes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ar",
        "ar/k",
        "ar/k/0",
        "ar/0/st",  # no key field at all
        "br/k/0/st",
        "ar/k/0/xx",
        "ar/k/0/rs/1",
        "ar/k/0/rs/1/2/3",
        "ar/k/0/ag/1/x",
        "ar/k/0/mv",
        "ar/k/0/mv/",
        "ar/k/0/st/",
        "ar/k/-1/st",
        "ar/k/01/st",
        "ar/k/0/rs/01/0",
        "ar/k/ 1/st",
        "ar/k/0/rs/\u0663/0",  # a non-ASCII digit
        "ar/k/attempt/st",
        "ar/k/join/st",  # the join scope carries only views
        "ar/k/join/rs/0/0",
    ],
)
def test_parse_rejects_malformed_tags(text):
    with pytest.raises(ValueError):
        Tag.parse(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Tag("k", -1, "st"),
        lambda: Tag("k", True, "st"),
        lambda: Tag("k", "later", "st"),  # type: ignore[arg-type]
        lambda: Tag("k", 0, "xx"),  # type: ignore[arg-type]
        lambda: Tag("k", 0, "rs", (1,)),
        lambda: Tag("k", 0, "st", (1,)),
        lambda: Tag("k", 0, "mv", (-1,)),
        lambda: Tag("k", 0, "ag", (1, True)),
        lambda: Tag("k", JOIN, "st"),
    ],
)
def test_tags_outside_the_grammar_cannot_be_made(make):
    with pytest.raises(ValueError):
        make()


# --- the schedule ---------------------------------------------------------------------------


@given(keys, attempts, member_sets, numels, piece_sizes)
def test_every_part_and_piece_has_exactly_one_owner(key, attempt, members, numel, piece_elems):
    by_member = schedules(key, attempt, members, numel, piece_elems)
    owned = Counter(s.my_part for s in by_member.values())
    assert owned == Counter(range(len(members)))  # every part index, exactly once
    for s in by_member.values():
        assert s.owner(s.my_part) == s.me
    covered = sorted(r for s in by_member.values() for r in s.my_pieces)
    position = 0
    for start, end in covered:  # the owners' pieces tile the vector, no gap, no overlap
        assert start == position and end > start
        position = end
    assert position == numel


@given(keys, attempts, member_sets, numels, piece_sizes)
def test_every_send_meets_exactly_one_posted_receive(key, attempt, members, numel, piece_elems):
    by_member = schedules(key, attempt, members, numel, piece_elems)
    sends = [t for s in by_member.values() for t in s.sends()]
    receives = [t for s in by_member.values() for t in s.receives()]
    for me, s in by_member.items():
        assert all(t.sender == me and t.receiver != me for t in s.sends())
        assert all(t.receiver == me and t.sender != me for t in s.receives())
    # the data plane matches a message by (sender, receiver, tag): each must be unique ...
    sent = Counter((t.sender, t.receiver, t.tag) for t in sends)
    posted = Counter((t.sender, t.receiver, t.tag) for t in receives)
    assert set(sent.values()) <= {1} and set(posted.values()) <= {1}
    # ... and both ends must agree on it, and on which piece it carries
    assert sent == posted
    assert set(sends) == set(receives)


@given(keys, attempts, member_sets, numels, piece_sizes)
def test_the_exchange_moves_every_piece_to_and_from_its_owner(
    key, attempt, members, numel, piece_elems
):
    by_member = schedules(key, attempt, members, numel, piece_elems)
    n = len(members)
    for s in by_member.values():
        mine = len(s.my_pieces)
        others = sum(len(s.plan.pieces(j)) for j in range(n) if j != s.my_part)
        # reduce-scatter: each piece of my part from each other member; all-gather: every
        # piece of every other part from its owner, and each of my pieces to every other member
        assert len(s.contributions_in()) == mine * (n - 1)
        assert len(s.parts_in()) == others
        assert len(s.contributions_out()) == others
        assert len(s.parts_out()) == mine * (n - 1)
        for t in s.sends() + s.receives():
            assert (t.start, t.end) == s.plan.pieces(t.part)[t.piece]
            parsed = Tag.parse(t.tag)
            assert (parsed.key, parsed.scope, parsed.numbers) == (key, attempt, (t.part, t.piece))
            assert parsed.kind == ("rs" if t.receiver == s.owner(t.part) else "ag")
            assert t.tag.startswith(s.prefix)
        assert Tag.parse(s.status_tag) == Tag.status(key, attempt)


@given(keys, attempts, member_sets, numels, piece_sizes, st.randoms(use_true_random=False))
def test_members_listed_in_any_order_compute_the_same_schedule(
    key, attempt, members, numel, piece_elems, random
):
    shuffled = [*members, *members[:1]]  # a duplicate, too
    random.shuffle(shuffled)
    for me in members:
        a = AllReduceSchedule.build(key, attempt, members, me, numel, piece_elems)
        b = AllReduceSchedule.build(key, attempt, shuffled, me, numel, piece_elems)
        assert a == b
        assert a.sends() == b.sends() and a.receives() == b.receives()


def test_schedule_of_three_members_by_hand():
    plan = Plan(("a", "b", "c"), 4 * BLOCK + 10, BLOCK)  # parts of 2, 2 and 1 pieces
    s = AllReduceSchedule("k", 1, plan, "b")
    assert s.my_part == 1 and s.others == ["a", "c"] and s.prefix == "ar/k/1/"
    assert s.my_pieces == [(2 * BLOCK, 3 * BLOCK), (3 * BLOCK, 4 * BLOCK)]
    assert s.contributions_in() == [
        Transfer("a", "b", "ar/k/1/rs/1/0", 1, 0, 2 * BLOCK, 3 * BLOCK),
        Transfer("c", "b", "ar/k/1/rs/1/0", 1, 0, 2 * BLOCK, 3 * BLOCK),
        Transfer("a", "b", "ar/k/1/rs/1/1", 1, 1, 3 * BLOCK, 4 * BLOCK),
        Transfer("c", "b", "ar/k/1/rs/1/1", 1, 1, 3 * BLOCK, 4 * BLOCK),
    ]
    assert [(t.receiver, t.tag) for t in s.contributions_out()] == [
        ("a", "ar/k/1/rs/0/0"),
        ("a", "ar/k/1/rs/0/1"),
        ("c", "ar/k/1/rs/2/0"),
    ]
    assert s.contributions_to(1) == []  # an owner keeps its own contribution
    assert [(t.sender, t.tag, t.numel) for t in s.parts_in()] == [
        ("a", "ar/k/1/ag/0/0", BLOCK),
        ("a", "ar/k/1/ag/0/1", BLOCK),
        ("c", "ar/k/1/ag/2/0", 10),
    ]
    assert [(t.receiver, t.tag) for t in s.reduced_out(1)] == [
        ("a", "ar/k/1/ag/1/1"),
        ("c", "ar/k/1/ag/1/1"),
    ]
    assert s.status_tag == "ar/k/1/st"


def test_schedule_refuses_an_outsider_and_unsorted_members():
    with pytest.raises(ValueError):
        AllReduceSchedule("k", 0, Plan(("a", "b"), 10), "z")
    with pytest.raises(ValueError):
        AllReduceSchedule("k", 0, Plan(("b", "a"), 10), "a")
    with pytest.raises(ValueError):
        AllReduceSchedule("k", -1, Plan(("a", "b"), 10), "a")


# --- agreeing on members: today's rule --------------------------------------------------------


def run_rounds(agreement: MembershipAgreement, *rounds: dict) -> list[list[str]]:
    """Feed one views dict per round; the proposals after each."""
    seen = []
    for views in rounds:
        assert not agreement.done
        seen.append(agreement.on_views(views))
    return seen


@pytest.mark.parametrize(
    ("proposal", "views", "after"),
    [
        # everyone answers with the same view: nothing changes
        (["a", "b", "c"], {"b": {"a", "b", "c"}, "c": {"a", "b", "c"}}, ["a", "b", "c"]),
        # a peer that sent nothing (silent, unreachable or unreadable) is left out
        (["a", "b", "c"], {"b": {"a", "b", "c"}}, ["a", "b"]),
        (["a", "b", "c"], {"b": {"a", "b", "c"}, "c": None}, ["a", "b"]),
        # a view without me counts as "the proposal without that peer" (its other members stay)
        (["a", "b", "c"], {"b": {"b", "c"}, "c": {"a", "b", "c"}}, ["a", "c"]),
        # a view without a third peer drops that peer (intersection)
        (["a", "b", "c"], {"b": {"a", "b"}, "c": {"a", "b", "c"}}, ["a", "b"]),
        # a stranger in a view is never added
        (["a", "b"], {"b": {"a", "b", "z"}}, ["a", "b"]),
        # views from peers outside the proposal are ignored
        (["a", "b"], {"b": {"a", "b"}, "z": {"a"}}, ["a", "b"]),
        # an empty view lacks me: only that peer goes
        (["a", "b", "c"], {"b": set(), "c": {"a", "b", "c"}}, ["a", "c"]),
    ],
)
def test_agreement_round_keeps_the_intersection_of_counted_views(proposal, views, after):
    agreement = MembershipAgreement("a", proposal)
    assert agreement.peers == [p for p in sorted(proposal) if p != "a"]
    assert agreement.on_views(views) == after
    assert agreement.round == 1


def test_agreement_sorts_and_deduplicates_the_proposal():
    agreement = MembershipAgreement("a", ["c", "a", "b", "c"])
    assert agreement.proposal == ["a", "b", "c"] and agreement.peers == ["b", "c"]


@pytest.mark.parametrize(
    ("proposal", "result"),
    [(["a"], ["a"]), (["a", "a"], ["a"]), (["c", "b"], ["b", "c"]), ([], [])],
)
def test_agreement_is_over_at_once_when_only_me_or_without_me(proposal, result):
    agreement = MembershipAgreement("a", proposal)
    assert agreement.done and agreement.proposal == result
    with pytest.raises(ValueError):
        agreement.on_views({})


def test_agreement_runs_exactly_two_rounds_even_when_round_one_agrees():
    full = {"a", "b", "c"}
    agreement = MembershipAgreement("a", ["a", "b", "c"])
    assert AGREEMENT_ROUNDS == 2
    views = {"b": full, "c": full}
    assert run_rounds(agreement, views, views) == [["a", "b", "c"], ["a", "b", "c"]]
    assert agreement.done
    with pytest.raises(ValueError):
        agreement.on_views(views)


def test_agreement_ends_early_once_only_me_is_left():
    agreement = MembershipAgreement("a", ["a", "b"])
    assert agreement.on_views({}) == ["a"]
    assert agreement.done and agreement.round == 1


def test_round_two_spreads_what_round_one_learned():
    # c reached a, then died before b heard from it: a and b still end on the same list
    a = MembershipAgreement("a", ["a", "b", "c"])
    b = MembershipAgreement("b", ["a", "b", "c"])
    first_a, first_b = set(a.proposal), set(b.proposal)
    a.on_views({"b": first_b, "c": {"a", "b", "c"}})
    b.on_views({"a": first_a})
    assert (a.proposal, b.proposal) == (["a", "b", "c"], ["a", "b"])
    second_a, second_b = set(a.proposal), set(b.proposal)
    a.on_views({"b": second_b})
    b.on_views({"a": second_a})
    assert a.proposal == b.proposal == ["a", "b"]


def test_silence_in_the_last_round_drops_nobody():
    # c answered everyone in round 1, then died having sent its round-2 view to a only: the
    # last round's silence must not split a (heard c) from b (did not)
    a = MembershipAgreement("a", ["a", "b", "c"])
    b = MembershipAgreement("b", ["a", "b", "c"])
    full = {"a", "b", "c"}
    a.on_views({"b": full, "c": full})
    b.on_views({"a": full, "c": full})
    a.on_views({"b": full, "c": full})
    b.on_views({"a": full})
    assert a.proposal == b.proposal == ["a", "b", "c"]  # the attempt's statuses put c out
    # a view without me still drops its sender in the last round
    d = MembershipAgreement("a", ["a", "b", "c"], round=1)
    assert d.on_views({"b": {"b", "c"}}) == ["a", "c"]


@given(member_sets, st.data())
def test_members_that_all_answer_agree_on_the_live_ones(members, data):
    # every member may start from a different view (each a superset of the live members);
    # the silent ones never answer; after the rounds every live member holds the same list
    silent = set(data.draw(st.lists(st.sampled_from(members), max_size=len(members) - 1)))
    live = [m for m in members if m not in silent]
    agreements = {m: MembershipAgreement(m, members) for m in live}
    while not all(x.done for x in agreements.values()):
        sent = {m: set(x.proposal) for m, x in agreements.items() if not x.done}
        for x in agreements.values():
            if not x.done:
                x.on_views({p: sent[p] for p in x.peers if p in sent})
    assert all(x.proposal == sorted(live) for x in agreements.values())


def test_counted_views_show_how_each_peer_was_counted():
    agreement = MembershipAgreement("a", ["a", "b", "c"])
    counted = agreement.counted_views({"b": {"b", "c"}})
    assert counted == [{"a", "b", "c"}, {"a", "c"}, {"a", "b"}]


# --- deciding after an attempt ------------------------------------------------


def test_decide_names_its_decision():
    members = ["a", "b"]
    ok = Status(True, [], {"a": members, "b": members}, {})
    decision = decide(members, {"a": ok, "b": ok})
    assert decision == Decision(commit=True, members=["a", "b"])
    assert decision.commit and decision.members == members
    assert decide(members, {"a": ok}) == Decision(True, ["a", "b"])  # silence vetoes nothing
    # everyone answered, but a member reported failure naming no part: it speaks for itself
    failed = Status(False, [], {"a": members, "b": members}, {})
    assert decide(members, {"a": ok, "b": failed}) == Decision(False, ["a"])
