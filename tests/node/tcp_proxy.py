"""A man in the middle for tests: a TCP proxy on 127.0.0.1 that records, flips or cuts bytes."""

from __future__ import annotations

import trio


class TcpProxy:
    """Forwards connections to ``target``; ``tamper(direction, offset, data) -> data | None``.

    Returning None from ``tamper`` cuts both sides of the connection; ``source`` makes every
    connection reach the target from one chosen loopback address.  All
    bytes seen client→server are kept in ``seen`` for eavesdropping checks.
    """

    def __init__(self, target: tuple[str, int], tamper=None, source: str | None = None) -> None:
        self.target = target
        self.source = source  # the address the proxy dials from (a 127.x.y.z of the test's)
        self.tamper = tamper
        self.seen = bytearray()
        self.port = 0
        self.connections = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.target, local_address=self.source)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def pump(src, dst, direction):
                offset = 0
                try:
                    while True:
                        data = await src.receive_some(65536)
                        if not data:
                            break
                        if direction == "c2s":
                            self.seen += data
                        if self.tamper is not None:
                            data = self.tamper(direction, offset, bytes(data))
                            if data is None:
                                break
                        offset += len(data)
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server, "c2s")
            nursery.start_soon(pump, server, client, "s2c")
