"""DiLoCo runs between real nodes on 127.0.0.1 (in one process): parity every round, an exact
single-process reference, a late joiner, a slow worker, a diverged member, state sync."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import trio
from conftest import wait_until
from diloco_helpers import TINY, SlowInner, swarm, train_all

from gossamer.training import DiLoCoConfig, DiLoCoWorker, Recipe, statesync
from gossamer.training.diloco_state import State
from gossamer.training.outer import (
    Contribution,
    apply_outer_step,
    init_outer_state,
    pseudo_gradient,
    state_digest,
    weighted_average,
)

torch.set_num_threads(1)


def reference_digests(recipe: Recipe, config: DiLoCoConfig, peer_ids: list[str]) -> list[str]:
    """The same run computed in one process: worker i is peer_ids[i] (its data shard i)."""
    inners = [recipe.inner_loop(i) for i in range(len(peer_ids))]
    params = {n: p.detach().clone() for n, p in inners[0].parameters().items()}
    outer = init_outer_state(params, lr=config.outer_lr, momentum=config.outer_momentum)
    digests = []
    for r in range(config.rounds or 0):
        contributions = []
        for i, inner in enumerate(inners):
            inner.load(params)
            tokens = 0
            for k in range(config.inner_steps):
                tokens += inner.step(r * config.inner_steps + k)[1]
            delta = pseudo_gradient(params, inner.parameters())
            contributions.append(Contribution(peer_ids[i], delta, tokens))
        params, outer = apply_outer_step(params, weighted_average(contributions), outer)
        digests.append(state_digest(params, outer))
    return digests


async def test_three_workers_stay_bit_identical_and_match_the_reference(node_config):
    recipe = dataclasses.replace(TINY, shards=3)
    # the reference is the plain tokens-weighted mean
    config = DiLoCoConfig(inner_steps=8, rounds=5, min_workers=3, aggregate="mean")
    async with swarm(node_config, 3, recipe, config) as members:
        workers = [
            DiLoCoWorker(node, run, recipe.inner_loop(i), config)
            for i, (node, run) in enumerate(members)
        ]
        results = await train_all(workers)
        ids = [node.peer_id for node, _ in members]
    for result in results:
        assert result.entered_by == ["fresh"]
        assert [r.round for r in result.records] == [0, 1, 2, 3, 4]
        assert result.parity_rounds == (5, 5)  # every round compared and matched
        assert all(len(r.members) == 3 and r.steps == 8 for r in result.records)
    for r in range(5):
        assert len({res.records[r].digest for res in results}) == 1
    assert [r.digest for r in results[0].records] == reference_digests(recipe, config, ids)


@pytest.mark.parametrize("overlap", ["none", "streaming", "eager"])
async def test_a_late_joiner_downloads_the_state_and_converges(node_config, overlap):
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=6, rounds=10, overlap=overlap)
    async with swarm(node_config, 3, recipe, config) as members:
        late_model = dataclasses.replace(recipe, seed=7).model()  # not the run's init
        # steps of a few milliseconds would make a round shorter than the run document takes to
        # spread an entry; a real round is seconds to minutes
        inners = [
            SlowInner(recipe.inner_loop(0), 0.03),
            SlowInner(recipe.inner_loop(1), 0.03),
            SlowInner(recipe.inner_loop(2, late_model), 0.03),
        ]
        workers = [
            DiLoCoWorker(node, run, inners[i], config) for i, (node, run) in enumerate(members)
        ]
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await workers[i].train()

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                nursery.start_soon(one, 1)
                await wait_until(
                    lambda: len(workers[0].records) >= 3, 90, interval=0.02, what="three rounds"
                )
                nursery.start_soon(one, 2)
    early, late = results[0], results[2]
    # one download, and the first exchange after it takes the newcomer in (an overlapped run's
    # newcomer announces itself two rounds ahead: rounds.plan_entry)
    assert late.entered_by == ["download"] and late.bytes_received_state > 0  # type: ignore[union-attr]
    joined_at = late.records[0].round  # type: ignore[union-attr]
    assert 3 <= joined_at < 10
    by_round = {r.round: r.digest for r in early.records}  # type: ignore[union-attr]
    for record in late.records:  # type: ignore[union-attr]
        assert record.digest == by_round[record.round]
        assert record.parity_ok and len(record.members) == 3
    assert late.final_digest == early.final_digest  # type: ignore[union-attr]
    joined_record = next(r for r in early.records if r.round == joined_at)  # type: ignore[union-attr]
    assert len(joined_record.members) == 3


async def test_a_slow_worker_contributes_fewer_steps_instead_of_stalling_the_round(node_config):
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=20, min_inner_steps=1, rounds=4, min_workers=3)
    async with swarm(node_config, 3, recipe, config) as members:
        inners = [recipe.inner_loop(i) for i in range(3)]
        inners[2] = SlowInner(inners[2], delay=0.1)  # at most ~6 steps while the others do 20
        workers = [
            DiLoCoWorker(node, run, inners[i], config) for i, (node, run) in enumerate(members)
        ]
        results = await train_all(workers)
    fast, slow = results[0], results[2]
    for r_fast, r_slow in zip(fast.records, slow.records, strict=True):
        assert r_fast.digest == r_slow.digest and len(r_fast.members) == 3
        assert r_slow.steps < r_fast.steps
        assert r_slow.tokens == r_slow.steps * recipe.batch_size * recipe.context
    assert sum(r.steps for r in slow.records) < 0.6 * sum(r.steps for r in fast.records)


class _Diverging(DiLoCoWorker):
    """Flips one bit of its state after the outer step of round 1 (a faulty member): every
    mode's parity check (parity_verdict) sees the flipped state."""

    async def parity_verdict(self, state, members):
        if state.round == 2 and not getattr(self, "_flipped", False):
            self._flipped = True
            params = {k: v.clone() for k, v in state.params.items()}
            name = sorted(params)[0]
            params[name].view(-1)[0] = torch.nextafter(
                params[name].view(-1)[0], torch.tensor(float("inf"))
            )
            state = State.of(params, state.outer)
        return await super().parity_verdict(state, members)


@pytest.mark.parametrize(
    "overlap",
    [
        "none",
        pytest.param(
            "streaming",
            marks=pytest.mark.xfail(
                reason=(
                    "known bug, about 1 run in 4: the faulty member leaves while a fragment's "
                    "membership agreement is between its two rounds; the two others end it "
                    "with different memberships (one kept the faulty), neither hears the "
                    "other's status in time, and both re-enter, so the run ends in a cascade "
                    "of re-entries"
                ),
                strict=False,
            ),
        ),
        "eager",
    ],
)
async def test_a_member_whose_state_diverges_refetches_it(node_config, caplog, overlap):
    caplog.set_level(logging.WARNING, logger="gossamer.training.diloco")
    recipe = dataclasses.replace(TINY, shards=3)
    # overlapped: the others run on while it re-enters, and in rounds this short its first
    # exchange back may start after theirs closed (it then re-enters once more): rounds to spare
    rounds_ = 6 if overlap == "none" else 10
    config = DiLoCoConfig(inner_steps=5, rounds=rounds_, min_workers=3, overlap=overlap)
    async with swarm(node_config, 3, recipe, config) as members:
        workers = [
            # rounds of a few ms would let the others publish round r+1 before our parity check
            # of round r reads the run document (an entry holds only a member's latest digest)
            (_Diverging if i == 2 else DiLoCoWorker)(
                node, run, SlowInner(recipe.inner_loop(i), 0.02), config
            )
            for i, (node, run) in enumerate(members)
        ]
        results = await train_all(workers)
    faulty = results[2]
    assert faulty.refetches == 1
    verdicts = [r.parity_ok for r in faulty.records]
    if overlap == "none":  # re-fetched in place: every round recorded
        assert verdicts == [True, False, True, True, True, True]
    else:  # the others are exchanges ahead: it re-enters the run (downloads a later state)
        assert verdicts[:2] == [True, False] and all(verdicts[2:]) and len(verdicts) >= 3
        assert faulty.entered_by[0] == "fresh" and set(faulty.entered_by[1:]) == {"download"}
    by_round = {r.round: r.digest for r in results[0].records}
    for record in faulty.records:  # after the re-fetch, it holds the others' bits again
        if record.parity_ok:
            assert record.digest == by_round[record.round]
    assert len({res.final_digest for res in results}) == 1
    assert any("re-fetching" in rec.getMessage() for rec in caplog.records)


async def test_state_sync_from_several_peers_survives_a_lying_one(nodes, monkeypatch, caplog):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", 4096)
    model = TINY.model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    outer = init_outer_state(params)
    outer.momentum_buffers = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    snapshot = statesync.make_snapshot(params, outer)
    assert len(snapshot.chunk_hashes()) >= 6
    async with nodes(4) as (a, b, c, joiner):
        for holder in (a, b, c):
            await joiner.connect(holder.addrs()[0])
            statesync.StateService.attach(holder).publish(snapshot, allowed=statesync.anyone)
        # c announces the right manifest but sends other bytes
        liar = statesync.Snapshot(
            snapshot.digest,
            snapshot.layout,
            snapshot.outer,
            snapshot.flat + 1.0,
            list(snapshot.chunk_hashes()),
        )
        statesync.StateService.attach(c).publish(liar)
        ids = [a.peer_id, b.peer_id, c.peer_id]
        fetched = await statesync.fetch_state(
            joiner, snapshot.digest, ids, expected_layout=statesync.layout_of(params)
        )
        assert fetched.digest == state_digest(fetched.params, fetched.outer) == snapshot.digest
        assert set(fetched.sources) == {a.peer_id, b.peer_id}  # chunks from both honest peers
        assert any("wrong hash" in r.getMessage() for r in caplog.records)
        other = {k: v for k, v in statesync.layout_of(params)[1:]}
        with pytest.raises(statesync.StateSyncError):
            await statesync.fetch_state(
                joiner, snapshot.digest, ids[:2], expected_layout=list(other.items())
            )
        with pytest.raises(statesync.StateSyncError):
            await statesync.fetch_state(joiner, "0" * 64, ids[:2], timeout=10)


@pytest.mark.parametrize("overlap", ["none", "streaming", "eager"])
async def test_a_whole_run_restarts_from_its_checkpoints(node_config, tmp_path, overlap):
    """Every member stops after round 2 (a crash of the whole run); a new run of the same
    members resumes from their checkpoints, in agreement, and trains to the end."""
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=6, rounds=6, min_workers=3, overlap=overlap)
    dirs = [tmp_path / f"ck{i}" for i in range(3)]
    stop_at = 3  # the round of the last state published: S_3 (rounds 0–2 trained)

    def workers_of(members, should_stop=None):
        return [
            DiLoCoWorker(
                node,
                run,
                SlowInner(recipe.inner_loop(i), 0.03),  # rounds longer than the doc's spread
                config,
                checkpoint_dir=dirs[i],
                should_stop=None if should_stop is None else (lambda i=i: should_stop(i)),
            )
            for i, (node, run) in enumerate(members)
        ]

    async with swarm(node_config, 3, recipe, config) as members:
        first: list[DiLoCoWorker] = []
        first += workers_of(members, lambda i: (first[i].state_round or 0) >= stop_at)
        before = await train_all(first)
    saved = {res.final_digest for res in before}
    # blocking rounds stop before round 3, overlapped ones once round 3's exchanges are in
    resume_at = stop_at if overlap == "none" else stop_at + 1
    assert len(saved) == 1 and {res.state.round for res in before} == {resume_at}  # type: ignore[union-attr]
    async with swarm(node_config, 3, recipe, config) as members:
        after = await train_all(workers_of(members))
    for res in after:
        assert res.entered_by == ["checkpoint"]
        assert sorted(r.round for r in res.records) == list(range(resume_at, 6))
        assert all(r.parity_ok and len(r.members) == 3 for r in res.records)
    assert len({res.final_digest for res in after}) == 1
    first_back = min(after[0].records, key=lambda r: r.round)
    assert first_back.digest not in saved  # it trained on from the saved state, not from scratch
