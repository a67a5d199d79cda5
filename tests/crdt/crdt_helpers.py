"""Shared helpers of the crdt tests: loopback nodes with the run-document service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from gossamer.crdt import CrdtService, SyncOptions
from gossamer.node import Node, NodeConfig

FAST = SyncOptions(
    anti_entropy_interval=0.5, maintain_interval=0.1, heartbeat_interval=0, dial_backoff=0.5
)


@contextlib.asynccontextmanager
async def crdt_nodes(
    configs: list[NodeConfig], options: SyncOptions = FAST
) -> AsyncIterator[list[CrdtService]]:
    """Nodes with the crdt service, each in its own task so that they stop concurrently
    (a node's stop costs ~0.2 s per open connection)."""

    async def serve(config: NodeConfig, stop: trio.Event, task_status) -> None:
        async with Node(config) as node:
            task_status.started(await CrdtService.start(node, options))
            await stop.wait()

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        services = [await nursery.start(serve, config, stop) for config in configs]
        try:
            yield services
        finally:
            stop.set()
