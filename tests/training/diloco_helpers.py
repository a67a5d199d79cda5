"""Shared helpers of the DiLoCo tests: a swarm of loopback nodes in one run, tiny recipe."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import trio

from gossamer.crdt import CrdtService, SyncOptions
from gossamer.node import Node
from gossamer.training import DiLoCoConfig, DiLoCoWorker, Recipe

FAST = SyncOptions(
    anti_entropy_interval=0.5, maintain_interval=0.1, heartbeat_interval=0, dial_backoff=0.5
)
TINY = Recipe(n_layer=1, n_head=2, d_model=32, context=32, batch_size=4, schedule_steps=80)


@contextlib.asynccontextmanager
async def swarm(node_config, n: int, recipe: Recipe, config: DiLoCoConfig) -> AsyncIterator:
    """n loopback nodes in one run (node 0 hosts it); yields [(node, run)]."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(node_config())) for _ in range(n)]
        services = [await CrdtService.start(node, FAST) for node in nodes]
        run_config = {**recipe.to_config(), "hparams": {"diloco": config.to_dict()}}
        host = await services[0].host_run("test", config=run_config)
        runs = [host]
        for service in services[1:]:
            runs.append(await service.join_run(host.run_id, bootstrap=[nodes[0].addrs()[0]]))
        yield list(zip(nodes, runs, strict=True))


async def train_all(workers: list[DiLoCoWorker]) -> list:
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = await workers[i].train()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(len(workers)):
                nursery.start_soon(one, i)
    return [results[i] for i in range(len(workers))]


class SlowInner:
    """An inner loop that takes ``delay`` extra seconds per step (a slower machine)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def step(self, step: int):
        time.sleep(self.delay)
        return self.inner.step(step)

    def __getattr__(self, name):
        return getattr(self.inner, name)
