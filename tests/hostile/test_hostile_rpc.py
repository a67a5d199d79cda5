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


async def test_a_peer_sending_bad_requests_gets_one_log_line_a_minute(node_config, caplog) -> None:
    # 200 malformed requests, each on its own stream: every one gets its error answer, and the
    # server's log gets one line for the lot (it was a line per request: a disk-filling tool)
    import logging

    from gossamer.node.wire import frame

    caplog.set_level(logging.INFO, logger="gossamer")
    async with Node(node_config("server")) as server, Node(node_config()) as hostile:
        await hostile.connect(server.addrs()[0])
        answered = 0
        for i in range(200):
            stream = await hostile.open_stream(server.peer_id, "/gossamer/node/1.0.0")
            await stream.write(frame(b"\xc1" if i % 2 else b"\x92\x01"))  # never-used, truncated
            with trio.move_on_after(2):
                answered += bool(await stream.read(65536))
            await stream.reset()
        assert answered == 200
        await server.ping(hostile.peer_id, timeout=5)  # the hostile peer is not banned: loopback
    lines = [r for r in caplog.records if r.name == "gossamer.node.rpc"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "bad request" in lines[0].getMessage()
