"""Streams a peer opens, writes into and resets leave nothing behind in the muxer."""

from __future__ import annotations

import trio
from conftest import wait_until

PROTOCOL = "/gossamer-test/slow-reader/1"


async def test_streams_a_peer_resets_before_we_read_them_leave_nothing_behind(nodes) -> None:
    async with nodes(2) as (server, hostile):
        handled = [0]

        async def slow_reader(stream) -> None:
            # reads one byte of the 32 KiB it is sent, is slow, then closes: by then the peer
            # has reset the stream, and the rest of its bytes sit unread in the muxer
            await stream.read(1)
            await trio.sleep(0.5)
            await stream.close()
            handled[0] += 1

        server.set_stream_handler(PROTOCOL, slow_reader)
        await hostile.connect(server.addrs()[0])
        for _ in range(40):
            stream = await hostile.open_stream(server.peer_id, PROTOCOL)
            await stream.write(b"x" * 32768)
            await stream.reset()
        await wait_until(lambda: handled[0] == 40, timeout=20, what="every stream handled")

        def drained() -> bool:
            stats = server.host.muxer_stats()
            return stats["buffered_bytes"] == 0 and stats["streams"] <= 4 and stats["events"] <= 4

        await wait_until(drained, timeout=10, what=f"an empty muxer ({server.host.muxer_stats()})")
        assert server.is_connected(hostile.peer_id)  # the connection lives on: it was not that


async def test_streams_reset_under_a_waiting_reader_leave_no_wake_up_events(nodes) -> None:
    async with nodes(2) as (server, hostile):
        reading = [0]
        ended = [0]

        async def reader(stream) -> None:
            # reads all it gets, and is waiting for more when the peer resets the stream
            try:
                while await stream.read(65536):
                    reading[0] += 1
            except ConnectionError:
                pass
            ended[0] += 1

        server.set_stream_handler(PROTOCOL, reader)
        await hostile.connect(server.addrs()[0])
        for i in range(40):
            stream = await hostile.open_stream(server.peer_id, PROTOCOL)
            await stream.write(b"hello")
            await wait_until(lambda i=i: reading[0] > i, what="the server reading")
            await stream.reset()
        await wait_until(lambda: ended[0] == 40, timeout=20, what="every reader ended")
        await wait_until(
            lambda: server.host.muxer_stats()["events"] <= 4,
            timeout=10,
            what=f"no orphan events ({server.host.muxer_stats()})",
        )
