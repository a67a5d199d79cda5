"""A gossamer node inside a NAT-lab namespace, driven over stdin/stdout (JSON lines).

``python -m gossamer.bench._natlab_agent '<json settings>'``: the settings are
NodeConfig fields plus ``dht`` (bool: attach the DHT, default true when the
DHT package is importable).  The node prints ``{"ready": {...}}`` once it
listens, then answers one JSON line per command line:

    {"id": 1, "cmd": "status"}  ->  {"id": 1, "ok": true, "result": {...}}

It exits when stdin closes.  Torch is never imported here: relay and
bootstrap nodes must run without it, and the tensors sent are plain bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import trio

from gossamer.node import GossamerError, Node, NodeConfig, load_config

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, runner: NodeRunner) -> None:
        self.runner = runner
        self._out_lock = trio.Lock()
        self._blobs: dict[int, bytearray] = {}

    @property
    def node(self) -> Node:
        if self.runner.node is None:
            raise GossamerError("no node running")
        return self.runner.node

    async def emit(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, default=str) + "\n").encode()
        async with self._out_lock:
            await trio.to_thread.run_sync(_write_all, data)

    async def serve(self) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        async with trio.open_nursery() as nursery:
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        nursery.start_soon(self.handle, line)

    async def handle(self, line: bytes) -> None:
        request: dict[str, Any] = {}
        try:
            request = json.loads(line)
            method = getattr(self, "cmd_" + str(request.get("cmd")), None)
            if method is None:
                raise GossamerError(f"unknown command {request.get('cmd')!r}")
            params = {k: v for k, v in request.items() if k not in ("id", "cmd")}
            result = await method(**params)
            await self.emit({"id": request.get("id"), "ok": True, "result": result})
        except Exception as exc:
            log.info("command failed", exc_info=True)
            await self.emit(
                {"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            )

    # ------------------------------------------------------------ commands

    async def cmd_status(self) -> dict[str, Any]:
        status = self.node.status()
        status["connections"] = self.connections()
        status["torch_loaded"] = "torch" in sys.modules  # relays must run without it
        return status

    def connections(self) -> dict[str, list[dict[str, Any]]]:
        return self.node.connection_paths()

    async def cmd_connect(self, addr: str) -> str:
        return await self.node.connect(addr)

    async def cmd_disconnect(self, peer_id: str) -> None:
        await self.node.disconnect(peer_id)

    async def cmd_ping(self, peer_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """An RPC round trip; reports which kind of connection carried it."""
        start = time.perf_counter()
        await self.node.ping(peer_id, timeout=timeout)
        return {
            "rtt_ms": (time.perf_counter() - start) * 1000,
            "paths": self.node.connection_paths().get(peer_id, []),
        }

    async def cmd_send(self, peer_id: str, nbytes: int, tag: str, timeout: float = 120) -> Any:
        blob = self._blobs.get(nbytes)
        if blob is None:
            blob = bytearray(os.urandom(1 << 16)) * max(1, nbytes >> 16)
            blob = blob[:nbytes]
            self._blobs[nbytes] = blob
        start = time.perf_counter()
        report = await self.node.dataplane.send(peer_id, tag, {"blob": blob}, timeout=timeout)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "nbytes": report.nbytes,
            "path": report.path,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "paths": self.node.connection_paths().get(peer_id, []),
        }

    async def cmd_recv(self, peer_id: str, tag: str, timeout: float = 120) -> Any:
        start = time.perf_counter()
        received = await self.node.dataplane.recv(peer_id, tag, timeout=timeout)
        blob = received.tensors["blob"]
        return {
            "seconds": time.perf_counter() - start,
            "nbytes": len(blob),
            "path": received.path,
            "sha256": hashlib.sha256(blob).hexdigest(),
        }

    async def cmd_peer_record(self, peer_id: str, timeout: float = 10.0) -> list[str]:
        """The addresses ``peer_id`` published in the DHT (its signed peer record)."""
        from gossamer.dht import DHT, peer_record_key

        dht = self.node.service(DHT)
        if dht is None:
            raise GossamerError("this node runs no DHT")
        record = await dht.get(peer_record_key(peer_id), timeout=timeout)
        value = record.value if record is not None else None
        return list(value.get("addrs", [])) if isinstance(value, dict) else []

    async def cmd_sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def cmd_restart(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Replace the node by a fresh one (e.g. a new data dir and listen port)."""
        node = await self.runner.start(settings)
        return {"peer_id": node.peer_id, "addrs": node.addrs()}


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


class NodeRunner:
    """Runs the agent's node; ``restart`` replaces it by a fresh one (new config)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.node: Node | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None

    async def start(self, settings: dict[str, Any]) -> Node:
        await self.stop()
        self._done = trio.Event()
        return await self._nursery.start(self._run, dict(settings), self._done)

    async def stop(self) -> None:
        if self._scope is not None and self._done is not None:
            self._scope.cancel()
            await self._done.wait()
        self.node = None

    async def _run(self, settings: dict[str, Any], done: trio.Event, task_status: Any) -> None:
        try:
            use_dht = settings.pop("dht", True)
            dht_config = settings.pop("dht_config", {})
            # py-libp2p's own DCUtR service instead of gossamer's (for comparison)
            stock_dcutr = settings.pop("stock_dcutr", False)
            if stock_dcutr:
                settings["holepunch"] = False
            config: NodeConfig = load_config(None, env={}, overrides=settings)
            async with Node(config) as node:
                if use_dht:
                    try:
                        from gossamer.dht import DHT, DHTConfig
                    except ImportError:
                        log.info("no DHT package: none")
                    else:
                        await DHT.start(node, DHTConfig(**dht_config))
                with trio.CancelScope() as scope:
                    self._scope, self.node = scope, node
                    if stock_dcutr:
                        node.nursery.start_soon(node.host.run_stock_dcutr)
                    task_status.started(node)
                    await trio.sleep_forever()
        finally:
            done.set()


async def main(settings: dict[str, Any]) -> None:
    config = load_config(
        None,
        env={},
        overrides={
            k: v for k, v in settings.items() if k not in ("dht", "dht_config", "stock_dcutr")
        },
    )
    logging.basicConfig(
        level=logging.DEBUG if config.log_level == "debug" else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    async with trio.open_nursery() as nursery:
        runner = NodeRunner(nursery)
        node = await runner.start(settings)
        agent = Agent(runner)
        await agent.emit({"ready": {"peer_id": node.peer_id, "addrs": node.addrs()}})
        await agent.serve()
        await runner.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
