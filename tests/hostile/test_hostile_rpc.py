"""RPC under pressure from several peers: a global cap on open streams, and errors that carry
our words only."""

from __future__ import annotations

import trio

from gossamer.node import CallContext, GossamerError, Node, Service
from gossamer.node.rpc import rpc


class Slow(Service):
    name = "slow"

    def __init__(self) -> None:
        self.running = 0
        self.release = trio.Event()

    @rpc
    async def wait(self, ctx: CallContext) -> int:
        self.running += 1
        await self.release.wait()
        return 1


async def test_streams_from_all_peers_together_are_capped(node_config) -> None:
    from conftest import wait_until

    async with (
        Node(node_config("server", rpc_max_concurrent_streams=2)) as server,
        Node(node_config()) as a,
        Node(node_config()) as b,
        Node(node_config()) as c,
    ):
        slow = Slow()
        server.register(slow)
        outcomes: dict[str, str] = {}

        async def call(node: Node) -> None:
            try:
                await node.call(server.peer_id, "slow", "wait", {}, timeout=10)
                outcomes[node.peer_id] = "answered"
            except GossamerError:
                outcomes[node.peer_id] = "refused"

        for node in (a, b, c):
            await node.connect(server.addrs()[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, a)
            nursery.start_soon(call, b)
            await wait_until(lambda: slow.running == 2, 10, what="two calls running")
            await call(c)  # a third stream while two are open: reset, not queued
            assert outcomes[c.peer_id] == "refused"
            slow.release.set()
        assert outcomes[a.peer_id] == outcomes[b.peer_id] == "answered"
        await call(c)  # the slots came back
        assert outcomes[c.peer_id] == "answered"
