"""The all-reduce's messages on the data plane, every one bounded by a deadline.

A send that fails or runs past its deadline is reported, not raised, and a wait gives up at its
deadline (or soon after the peer disconnects), so a dead member costs the others one deadline,
never a hang.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from gossamer.node import GossamerError

log = logging.getLogger(__name__)


class Links:
    """The sends and waits of one all-reduce (``key``) on ``node``; counts the bytes it sent."""

    def __init__(self, node: Any, key: str) -> None:
        self.node = node
        self.key = key
        self.me = node.peer_id
        self.bytes_sent = 0

    async def wait_from(self, peer: str, pending: Any, deadline: float) -> Any:
        """Like :func:`wait`, but give up as soon as ``peer`` disconnects."""
        if not self.node.is_connected(peer):
            # not connected (yet): the message may still come over a new connection
            return await wait(pending, deadline)
        result: list[Any] = [None]
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                result[0] = await wait(pending, deadline)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                while self.node.is_connected(peer):
                    await trio.sleep(0.05)
                # a disconnected peer may have delivered its last bytes just before
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()

            nursery.start_soon(receive)
            nursery.start_soon(watch)
        if result[0] is None and pending.done:
            return await wait(pending, deadline)
        return result[0]

    async def send(self, peer: str, tag: str, tensors: dict[str, Any], deadline: float) -> bool:
        try:
            with trio.fail_after(max(0.01, deadline - trio.current_time())):
                report = await self.node.dataplane.send(peer, tag, tensors)
            self.bytes_sent += report.nbytes
            return True
        except (GossamerError, trio.TooSlowError) as exc:
            log.info("all-reduce %s: sending %s to %s failed: %s", self.key, tag, peer[-8:], exc)
            return False

    async def send_all(
        self, peers: list[str], tag: str, payload: dict[str, Any], deadline: float
    ) -> set[str]:
        """Send ``payload`` to every peer at once; return those it could not reach."""
        failed: set[str] = set()

        async def one(peer: str) -> None:
            if not await self.send(peer, tag, payload, deadline):
                failed.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        return failed


async def wait(pending: Any, deadline: float) -> Any:
    """The received message, or None if it did not come before ``deadline``."""
    try:
        return await pending.wait(max(0.0, deadline - trio.current_time()))
    except GossamerError:
        return None
