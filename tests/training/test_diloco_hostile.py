"""DiLoCo runs between real nodes with a stranger in them: fake joiners, a revoked member."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import trio
from diloco_helpers import FAST, TINY, swarm, train_all

from gossamer.bench.adversary import sybil
from gossamer.crdt import CrdtService
from gossamer.node import Node
from gossamer.training import DiLoCoConfig, DiLoCoWorker

torch.set_num_threads(1)


async def test_fake_joiners_stop_costing_rounds_and_never_count_in_majorities(node_config):
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=4, rounds=6, min_workers=3, join_timeout=5.0)
    async with swarm(node_config, 3, recipe, config) as members, contextlib.AsyncExitStack() as st:
        host_addr = members[0][0].addrs()[0]
        sybil_runs = []
        for _ in range(3):
            node = await st.enter_async_context(Node(node_config()))
            service = await CrdtService.start(node, FAST)
            sybil_runs.append(await service.join_run(members[0][1].run_id, bootstrap=[host_addr]))
        sybils = {run.node.peer_id for run in sybil_runs}
        workers = [
            DiLoCoWorker(node, run, recipe.inner_loop(i), config)
            for i, (node, run) in enumerate(members)
        ]
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for run in sybil_runs:
                nursery.start_soon(sybil, run, stop, 0.3)
            results = await train_all(workers)
            stop.set()
    real = {node.peer_id for node, _ in members}
    for result in results:
        assert [r.round for r in result.records] == list(range(6))  # nothing vetoed
        assert all(set(r.members) == real for r in result.records)
        assert result.parity_rounds[0] == result.parity_rounds[1]
    for worker in workers:
        assert worker.standing.veterans == real  # sybils never earned a say
        # each cost a join deadline in at most 3 of the 6 rounds (then skipped, backing off)
        assert all(1 <= worker.standing.misses.get(p, 0) <= 3 for p in sybils)


async def test_a_member_revoked_mid_run_is_refused_and_the_others_go_on(node_config):
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=4, rounds=5, min_workers=3, join_timeout=5.0)
    async with swarm(node_config, 3, recipe, config) as members:
        (host_node, host_run), _, (gone_node, gone_run) = members
        gone = gone_node.peer_id
        crdt = host_node.service(CrdtService)

        def on_event(event):
            if event.get("event") == "round" and event["round"] == 1:
                crdt.revoke(host_run.run_id, gone)  # between rounds 1 and 2

        workers = [
            DiLoCoWorker(
                node, run, recipe.inner_loop(i), config, on_event=on_event if i == 0 else None
            )
            for i, (node, run) in enumerate(members)
        ]
        results = {}

        async def one(i):
            results[i] = await workers[i].train()

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 2)
                async with trio.open_nursery() as honest:
                    honest.start_soon(one, 0)
                    honest.start_soon(one, 1)
                nursery.cancel_scope.cancel()  # the revoked member can only wait now
    for i in (0, 1):
        records = results[i].records
        assert [r.round for r in records] == [0, 1, 2, 3, 4]
        assert all(gone in r.members for r in records[:2])
        assert all(gone not in r.members for r in records[2:])  # refused from round 2 on
    assert not host_run.charter.may_join(gone)
    assert gone_run.charter.version == host_run.charter.version  # it was told
