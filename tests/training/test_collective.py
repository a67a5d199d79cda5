"""The all-reduce: pure parts, then real nodes on loopback."""

import logging

import pytest
import torch
import trio
from conftest import wait_until

from gossamer.training import all_reduce, get_codec
from gossamer.training.codecs import Codec, EncodedTensor
from gossamer.training.collective import AllReduce
from gossamer.training.collective_membership import Status, decide
from gossamer.training.collective_plan import BLOCK, Plan, reduce_piece, screen

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- pure


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 1000, 123_457])
@pytest.mark.parametrize("members", [1, 2, 3, 7])
def test_plan_covers_the_vector_with_aligned_disjoint_parts(numel, members):
    plan = Plan(tuple(f"p{i}" for i in range(members)), numel, piece_elems=512)
    covered = []
    for j in range(members):
        start, end = plan.part(j)
        assert start <= end and (start % BLOCK == 0 or start == end == numel)
        pieces = plan.pieces(j)
        assert all(a % BLOCK == 0 and b - a <= 512 for a, b in pieces)
        covered.extend(range(a, b) for a, b in pieces)
    flat = [i for r in covered for i in r]
    assert flat == list(range(numel))


def test_plan_refuses_unsorted_members():
    with pytest.raises(ValueError):
        Plan(("b", "a"), 10)


def test_reduce_piece_is_the_weighted_mean_in_peer_order():
    gen = torch.Generator().manual_seed(1)
    xs = {p: torch.randn(1000, generator=gen) for p in ("c", "a", "b")}
    ws = {"a": 1.0, "b": 3.0, "c": 6.0}
    reduced, total = reduce_piece({p: (xs[p], ws[p]) for p in ("b", "c", "a")})
    assert total == 10.0
    expected = torch.zeros(1000)
    for p in ("a", "b", "c"):
        expected.add_(xs[p] * (ws[p] / 10.0))
    assert torch.equal(reduced, expected)
    assert torch.allclose(reduced, (xs["a"] + 3 * xs["b"] + 6 * xs["c"]) / 10, atol=1e-6)


def test_screen_refuses_nan_and_outliers():
    base = {p: torch.ones(10) * (1 + i / 10) for i, p in enumerate("abcd")}
    assert screen(base) == {}
    assert "NaN" in screen({**base, "e": torch.tensor([float("nan")] * 10)})["e"]
    assert "median" in screen({**base, "e": torch.ones(10) * 1e6})["e"]
    # two contributors: no majority, only non-finite values are refused
    assert screen({"a": torch.ones(3), "b": torch.ones(3) * 1e9}) == {}


def test_the_direction_screen_refuses_a_sign_flip_and_keeps_honest_spread():
    gen = torch.Generator().manual_seed(5)
    common = torch.randn(4096, generator=gen)
    honest = {p: common + 1.5 * torch.randn(4096, generator=gen) for p in "abcd"}
    assert screen(honest, direction=True) == {}  # cosines ~0.3 with the median: all kept
    flipped = {**honest, "e": -honest["a"]}
    why = screen(flipped, direction=True)
    assert set(why) == {"e"} and "points away" in why["e"]
    assert screen(flipped) == {}  # the plain screen sees an honest norm


def test_decide_commits_only_on_unanimous_full_success():
    members = ["a", "b", "c"]
    full = {o: members for o in members}
    ok = Status(True, [], full, {})
    assert decide(members, {"a": ok, "b": ok, "c": ok})[:2] == (True, members)
    # a silent member (dead after its part and contributions went out) blocks nothing: the
    # members that heard its last status and those that did not decide the same
    assert decide(members, {"a": ok, "b": ok})[:2] == (True, members)
    # ... but what it owed still counts: a contribution two owners lack puts it out of the retry
    lacks_c = Status(True, [], {**full, "a": ["a", "b"], "b": ["a", "b"]}, {})
    assert decide(members, {"a": lacks_c, "b": lacks_c})[:2] == (False, ["a", "b"])
    # a silent owner whose part one member lacks is out, not that member (it died mid-part)
    half = Status(False, ["c"], {"a": members, "b": members}, {})
    assert decide(members, {"a": ok, "b": half})[:2] == (False, ["a", "b"])
    # and a retry for another reason leaves the silent one out
    lacks_a = Status(False, ["a"], full, {})  # b alone lacks a's part: b cannot complete
    assert decide(members, {"a": ok, "b": lacks_a})[:2] == (False, ["a"])
    # an owner whose part two members lack is out
    missing = Status(False, ["c"], {"a": members, "b": members}, {})
    assert decide(members, {"a": missing, "b": missing, "c": ok})[:2] == (False, ["a", "b"])
    # an owner that refused a contributor, and an owner that got it too late: that part goes
    # without it; two owners leaving it out put it out
    refused = Status(True, [], full, {"c": "contains NaN or Inf"})
    assert decide(members, {"a": refused, "b": ok, "c": ok})[:2] == (True, members)
    assert decide(members, {"a": refused, "b": refused, "c": ok})[:2] == (False, ["a", "b"])
    late = Status(True, [], {**full, "a": ["a", "c"]}, {})  # b's piece reached a too late
    assert decide(members, {"a": late, "b": ok, "c": ok})[:2] == (True, members)


def test_no_lone_member_can_veto_or_drop_another():
    members = ["a", "b", "c", "d"]
    full = {o: members for o in members}
    ok = Status(True, [], full, {})
    # a liar says every other part is missing and refuses everyone: it is the one out
    liar = Status(False, ["b", "c", "d"], full, dict.fromkeys("bcd", "bad"))
    assert decide(members, {"a": liar, "b": ok, "c": ok, "d": ok})[:2] == (False, ["b", "c", "d"])
    # a bare failure without a reason speaks for its sender only
    failed = Status(False, [], full, {})
    assert decide(members, {"a": failed, "b": ok, "c": ok, "d": ok})[:2] == (False, ["b", "c", "d"])
    # what one member relays about another owner's part is not that owner's word
    relayed = Status(True, [], {**full, "b": ["b"]}, {})
    assert decide(members, {"a": relayed, "b": ok, "c": ok, "d": ok})[:2] == (True, members)
    # an owner that says its own part failed is out (a confession, not an accusation)
    own = Status(False, ["b"], full, {})
    assert decide(members, {"a": ok, "b": own, "c": ok, "d": ok})[:2] == (False, ["a", "c", "d"])


def test_decide_ignores_partial_parts_of_dropped_owners():
    members = ["a", "b", "c"]
    # c died while reducing its part: a got a piece of it summed without b
    a = Status(False, ["c"], {"a": ["a", "b"], "b": ["a", "b"], "c": ["a", "c"]}, {})
    b = Status(False, ["c"], {"a": ["a", "b"], "b": ["a", "b"]}, {})
    assert decide(members, {"a": a, "b": b})[:2] == (False, ["a", "b"])


def test_status_roundtrip_and_validation():
    status = Status(False, ["b"], {"a": ["a", "c"]}, {"b": "why"})
    assert Status.unpack(status.pack(), ["a", "b", "c"]) == status
    with pytest.raises(ValueError):
        Status.unpack(status.pack(), ["a", "c"])  # names a stranger
    with pytest.raises(Exception):  # noqa: B017 -- any typed refusal will do
        Status.unpack(b"\xc1garbage", ["a"])


# -------------------------------------------------------------------------- network


async def _mesh(group):
    for i, node in enumerate(group):
        for other in group[i + 1 :]:
            await node.connect(other.addrs()[0])


async def _run_all(group, members, xs, ws, **kwargs):
    results = {}

    async def one(node, x, w):
        results[node.peer_id] = await all_reduce(
            node, kwargs.pop("key", "k"), members, x, w, **dict(kwargs)
        )

    async with trio.open_nursery() as nursery:
        for node, x, w in zip(group, xs, ws, strict=True):
            nursery.start_soon(one, node, x, w)
    return results


async def _honest_three_and_a_liar(group, key, atol=1e-6, **kwargs):
    """All-reduce full(i + 1) among four, the last a liar; the honest three must leave it out
    and agree on their mean (2.0); returns the honest results."""
    members = [n.peer_id for n in group]
    liar = group[3].peer_id
    others = sorted(set(members) - {liar})
    xs = [torch.full((3000,), float(i + 1)) for i in range(4)]
    results = {}

    async def one(node, x):
        results[node.peer_id] = await all_reduce(node, key, members, x, 1.0, **kwargs)

    async with trio.open_nursery() as nursery:
        for node, x in zip(group[:3], xs[:3], strict=True):
            nursery.start_soon(one, node, x)
        nursery.start_soon(_shrug, one(group[3], xs[3]))
    for peer in others:
        assert results[peer].members == tuple(others)  # the liar is out, nobody else
        assert torch.equal(results[peer].tensor, results[others[0]].tensor)
        assert torch.allclose(results[peer].tensor, torch.full((3000,), 2.0), atol=atol)
    assert liar not in results  # it was told the others dropped it
    return [results[p] for p in others]


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4"])
async def test_all_reduce_bit_identical_and_within_codec_error(nodes, codec):
    async with nodes(3) as group:
        await _mesh(group)
        members = [n.peer_id for n in group]
        gen = torch.Generator().manual_seed(7)
        xs = [torch.randn(70_001, generator=gen) for _ in group]
        ws = [2.0, 3.0, 3.0]  # unequal, and each within the bound an owner admits (2x the median)
        results = await _run_all(group, members, xs, ws, piece_elems=8192)
        tensors = [r.tensor for r in results.values()]
        assert all(torch.equal(tensors[0], t) for t in tensors)
        assert all(
            r.members == tuple(sorted(members)) and r.attempts == 1 for r in results.values()
        )
        assert all(r.total_weight == 8.0 for r in results.values())
        reference = sum(w * x for w, x in zip(ws, xs, strict=True)) / 8.0
        error = (tensors[0] - reference).abs().max().item()
        if codec == "none":
            # exactly the single-process reduction, in peer-id order
            order = sorted(range(3), key=lambda i: members[i])
            exact = torch.zeros(70_001)
            for i in order:
                exact.add_(xs[i] * (ws[i] / 8.0))
            assert torch.equal(tensors[0], exact)
        else:
            c = get_codec(codec)
            # quantised once by each contributor and once more by the owner
            bound = max(c.error_bound(x).max().item() for x in xs) + c.error_bound(reference).max()
            assert error <= bound * 1.01


class _UncheckedFloat32(Codec):
    """What a broken or malicious peer sends: raw fp32 bytes, NaN included, no checks."""

    name = "none"

    def encode(self, tensor):
        raw = tensor.detach().contiguous().view(torch.uint8).reshape(-1)
        return EncodedTensor("none", tuple(tensor.shape), "float32", (raw,))

    def decode(self, encoded, *, expected_shape=None):
        return encoded.buffers[0].view(torch.float32).clone()

    def buffer_sizes(self, numel):
        return get_codec("none").buffer_sizes(numel)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["one part", "every part"])
async def test_non_finite_contribution_refused_and_logged(nodes, caplog, poison, where):
    async with nodes(3) as group:
        await _mesh(group)
        members = [n.peer_id for n in group]
        xs = [torch.ones(5000), torch.ones(5000) * 3, torch.ones(5000)]
        # the parts are [0, 1792), [1792, 3584), [3584, 5000)
        poisoned = [17] if where == "one part" else [17, 2000, 4000]
        for index in poisoned:
            xs[2][index] = poison
        results = {}

        async def one(node, x, codec):
            results[node.peer_id] = await AllReduce(
                node, "poison", members, codec=codec, phase_timeout=3
            ).run(x, 1.0)

        with caplog.at_level(logging.WARNING, logger="gossamer.training"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, group[0], xs[0], "none")
                nursery.start_soon(one, group[1], xs[1], "none")
                nursery.start_soon(_shrug, one(group[2], xs[2], _UncheckedFloat32()))
        refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
        assert any(
            group[2].peer_id[-8:] in m and ("finite" in m.lower() or "nan or inf" in m.lower())
            for m in refusals
        ), refusals
        for node in group[:2]:
            result = results[node.peer_id]
            if where == "every part":
                # every owner but itself refused it: it is out, the mean is the others'
                assert group[2].peer_id not in result.members
                assert torch.equal(result.tensor, torch.ones(5000) * 2)
            else:
                # one owner refused it: that part goes without it, the rest of it stands
                # (one owner's word does not drop a member from the round)
                assert group[2].peer_id in result.members
                assert torch.isfinite(result.tensor).all()
                assert result.tensor[17] == 2.0
                rest = result.tensor[2000:]
                assert torch.allclose(rest, torch.full_like(rest, 5 / 3))


async def _shrug(coroutine):
    """Run a misbehaving member; whatever becomes of it is not the test's concern."""
    try:
        await coroutine
    except Exception as exc:
        logging.getLogger("test").info("poisoned member ended with %r", exc)


async def test_outlier_contribution_refused(nodes):
    async with nodes(4) as group:
        await _mesh(group)
        members = [n.peer_id for n in group]
        xs = [torch.ones(3000) * (1 + i / 100) for i in range(4)]
        xs[3] = torch.ones(3000) * 1e7
        results = {}

        async def one(node, x):
            try:
                results[node.peer_id] = await all_reduce(
                    node, "big", members, x, 1.0, phase_timeout=5
                )
            except Exception as exc:
                results[node.peer_id] = exc

        async with trio.open_nursery() as nursery:
            for node, x in zip(group, xs, strict=True):
                nursery.start_soon(one, node, x)
        for node in group[:3]:
            result = results[node.peer_id]
            assert group[3].peer_id not in result.members
            assert result.tensor.max().item() < 2


async def test_absent_member_is_dropped_and_views_converge(nodes):
    async with nodes(4, dial_timeout=2.0) as group:
        await _mesh(group)
        a, b, c, _absent = group
        everyone = [n.peer_id for n in group]
        three = [a.peer_id, b.peer_id, c.peer_id]
        xs = [torch.full((4000,), float(i)) for i in range(3)]
        results = {}

        async def one(node, view, x):
            results[node.peer_id] = await all_reduce(node, "views", view, x, 1.0, phase_timeout=3)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                # a and c believe the absent node is in; b does not
                nursery.start_soon(one, a, everyone, xs[0])
                nursery.start_soon(one, b, three, xs[1])
                nursery.start_soon(one, c, everyone, xs[2])
        for node in (a, b, c):
            result = results[node.peer_id]
            assert result.members == tuple(sorted(three))
            assert torch.equal(result.tensor, torch.full((4000,), 1.0))


async def test_member_dying_mid_collective(nodes, node_config):
    from gossamer.node import Node

    async with nodes(2, dial_timeout=2.0) as (a, b):
        results = {}
        big = 3_000_000

        async def one(node, members, x):
            results[node.peer_id] = await all_reduce(
                node, "die", members, x, 1.0, piece_elems=1 << 16, phase_timeout=4
            )

        async def doomed_member(members_box, task_status=trio.TASK_STATUS_IGNORED):
            async with Node(node_config("doomed", dial_timeout=2.0)) as doomed:
                await _mesh([a, b, doomed])
                members_box.extend([a.peer_id, b.peer_id, doomed.peer_id])
                task_status.started(doomed)
                await one(doomed, members_box, torch.ones(big) * 100)

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                members: list[str] = []
                async with trio.open_nursery() as inner:
                    doomed = await inner.start(doomed_member, members)
                    nursery.start_soon(one, a, members, torch.ones(big))
                    nursery.start_soon(one, b, members, torch.ones(big) * 3)
                    # die (node and all) once some of its contribution has left it (past
                    # the join); polled finely so it dies mid-transfer, not after it
                    await wait_until(
                        lambda: doomed.dataplane.bytes_sent >= 1 << 18,
                        40,
                        interval=0.001,
                        what="the doomed member sending",
                    )
                    inner.cancel_scope.cancel()
        for node in (a, b):
            result = results[node.peer_id]
            assert result.members == tuple(sorted([a.peer_id, b.peer_id]))
            assert result.attempts >= 2
            assert torch.equal(result.tensor, torch.full((big,), 2.0))


@pytest.mark.parametrize("rule", ["mean", "centered_clip"])
async def test_a_member_claiming_1e15_tokens_does_not_take_over_the_average(nodes, rule):
    # the takeover the issue reproduced: one of four claims 10^15 tokens with a large vector;
    # believed, the average was exactly its vector.  (4x the norm: from 5x on, its admitted 2x
    # weight puts it past the owners' 10x screen and the round drops it altogether.)
    from gossamer.training.aggregate import Aggregation

    async with nodes(4) as group:
        await _mesh(group)
        members = [n.peer_id for n in group]
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(20_000, generator=gen)
        xs = [base + 0.1 * torch.randn(20_000, generator=gen) for _ in range(3)]
        liar = 4 * torch.randn(20_000, generator=gen)
        results = await _run_all(
            group, members, [*xs, liar], [800.0, 800.0, 800.0, 1e15],
            piece_elems=4096, aggregation=Aggregation(rule=rule),
        )  # fmt: skip
        tensors = [r.tensor for r in results.values()]
        assert all(torch.equal(tensors[0], t) for t in tensors)
        honest_mean = torch.stack(xs).mean(0)
        off = float((tensors[0] - honest_mean).norm() / honest_mean.norm())
        taken = float((tensors[0] - liar).norm() / liar.norm())
        assert taken > 0.5  # not the liar's vector
        # bounded weight, plain mean: the liar weighs 2 honest shares, no more (2/5 of the
        # mean); centered clipping holds it to about one honest spread
        assert off < (0.5 if rule == "centered_clip" else 20.0), off
        assert all(r.total_weight <= 3 * 800.0 + 2 * 800.0 for r in results.values())


async def test_a_lying_status_vetoes_nothing(nodes, monkeypatch):
    # one of four says, after every attempt, that it lacks every other part and refused every
    # other member; it was believed, and no round of the honest three could commit
    import gossamer.training.collective as collective_module
    from gossamer.training.collective_membership import exchange_statuses

    async with nodes(4) as group:
        await _mesh(group)
        members = [n.peer_id for n in group]
        liar = group[3].peer_id
        others = sorted(set(members) - {liar})

        async def lying_exchange(links, schedule, mine, *args):
            if links.me == liar:
                mine = Status(False, others, mine.contributors, dict.fromkeys(others, "bad"))
            return await exchange_statuses(links, schedule, mine, *args)

        monkeypatch.setattr(collective_module, "exchange_statuses", lying_exchange)
        await _honest_three_and_a_liar(group, "veto")


@pytest.mark.parametrize("codec", ["none", "int8"])
async def test_a_lying_part_owner_is_caught_by_its_verifier_and_left_out(nodes, monkeypatch, codec):
    # the owner of a part sends -10x what it reduced: receivers only checked that values
    # decode, and parity could not see it (everyone got the same bytes)
    from gossamer.training import collective_exchange

    async with nodes(4) as group:
        await _mesh(group)
        liar = group[3].peer_id
        honest_reduce = collective_exchange.PieceExchange._reduce_into

        def lying_reduce(self, contributions, out, a, b):
            encoded, total = honest_reduce(self, contributions, out, a, b)
            if self.me != liar:
                return encoded, total
            out[a:b] *= -10.0
            return self.codec.encode(out[a:b].clone()), total

        monkeypatch.setattr(collective_exchange.PieceExchange, "_reduce_into", lying_reduce)
        honest = await _honest_three_and_a_liar(
            group, "owner", atol=0.05, codec=codec, piece_elems=1024
        )
        assert all(r.attempts >= 2 for r in honest)  # caught, re-paired, caught again


def test_decide_disputes_pair_owner_and_verifier_until_one_has_two_partners():
    members = ["a", "b", "c", "d"]
    ok = Status(True)
    verifier_of = {"a": "b", "b": "c", "c": "d", "d": "a"}
    # b, a's verifier, says a's part is wrong: no commit, nobody out yet
    statuses = {"a": ok, "b": Status(True, disputed=["a"]), "c": ok, "d": ok}
    decision = decide(members, statuses, verifier_of)
    assert decision[:3] == (False, members, (("a", "b"),))
    # a disputed again, by another verifier: a disagrees with two members and goes
    statuses = {"a": ok, "b": ok, "c": ok, "d": Status(True, disputed=["a"])}
    again = decide(members, statuses, {"a": "d"}, {"a": {"b"}, "b": {"a"}})
    assert again.members == ["b", "c", "d"] and not again.commit
    # two disputes in one attempt (a slow moment, say) put nobody out yet
    statuses = {"a": ok, "b": Status(True, disputed=["a"]), "c": ok, "d": ok}
    statuses["a"] = Status(True, disputed=["d"])
    once = decide(members, statuses, verifier_of)
    assert once.members == members and len(once.disputes) == 2
    # a dispute only counts from the part's verifier; one member's mismatch puts it out alone
    statuses = {"a": ok, "b": ok, "c": Status(True, disputed=["a"]), "d": ok}
    assert decide(members, statuses, verifier_of)[:2] == (True, members)
    statuses = {"a": ok, "b": ok, "c": Status(True, mismatched=["a"]), "d": ok}
    assert decide(members, statuses, verifier_of)[:2] == (False, ["a", "b", "d"])
    statuses = {
        "a": ok,
        "b": ok,
        "c": Status(True, mismatched=["a"]),
        "d": Status(True, mismatched=["a"]),
    }
    assert decide(members, statuses, verifier_of)[:3] == (False, members, (("a", "b"),))


async def test_a_two_faced_contributor_is_proven_and_dropped_alone(nodes, monkeypatch):
    # a member sends one piece to a part's owner and another (both signed) to its verifier:
    # unsigned, the two honest members would disagree, attempt after attempt, with new partners
    from gossamer.training import collective_exchange

    async with nodes(4) as group:
        await _mesh(group)
        liar = group[3].peer_id
        honest_send = collective_exchange.PieceExchange.send_contributions

        async def two_faced(self, schedule, part, flat, weight, deadline, state):
            if self.me != liar:
                return await honest_send(self, schedule, part, flat, weight, deadline, state)
            to_owner = {t.piece: t for t in schedule.contributions_to(part)}
            for copy in schedule.copies_to_verifier(part):
                for transfer, values in ((to_owner.get(copy.piece), flat), (copy, flat + 1.0)):
                    if transfer is None:
                        continue
                    encoded = self.codec.encode(values[transfer.start : transfer.end].clone())
                    _, sig = self._signed(schedule, part, transfer.piece, weight, encoded.buffers)
                    message = {
                        **collective_exchange._buffers(encoded),
                        "w": torch.tensor([weight], dtype=torch.float64),
                        "s": torch.frombuffer(bytearray(sig), dtype=torch.uint8),
                    }
                    await self.links.send(transfer.receiver, transfer.tag, message, deadline)

        monkeypatch.setattr(collective_exchange.PieceExchange, "send_contributions", two_faced)
        honest = await _honest_three_and_a_liar(group, "faces")
        assert all(r.attempts == 2 for r in honest)  # proven in the first attempt


def test_a_forged_proof_accuses_nobody():
    from gossamer.node import Identity
    from gossamer.training import collective_evidence as evidence

    alice, mallory = Identity.generate(), Identity.generate()
    d1, d2 = b"\x01" * 32, b"\x02" * 32
    s1 = evidence.sign(alice, "k", 0, 1, 2, 5.0, d1)
    s2 = evidence.sign(alice, "k", 0, 1, 2, 5.0, d2)
    proof = evidence.Proof(alice.peer_id, 1, 2, (5.0, d1, s1), (5.0, d2, s2))
    assert proof.holds("k", 0)
    assert not proof.holds("k", 1)  # another attempt's context
    forged = evidence.sign(mallory, "k", 0, 1, 2, 5.0, d2)
    assert not evidence.Proof(alice.peer_id, 1, 2, (5.0, d1, s1), (5.0, d2, forged)).holds("k", 0)
    assert not evidence.Proof(alice.peer_id, 1, 2, (5.0, d1, s1), (5.0, d1, s1)).holds("k", 0)
    assert evidence.Proof.unpack(proof.pack()) == proof
    with pytest.raises(ValueError):
        evidence.Proof.unpack(["x", 1, 2])


def test_decide_names_the_contributors_one_owner_left_out_alone():
    members = ["a", "b", "c"]
    ok = Status(True, contributors={})
    alone = Status(True, refused={"c": "late"})
    decision = decide(members, {"a": alone, "b": ok, "c": ok})
    assert decision.commit and decision.lone_exclusions == (("a", "c"),)
