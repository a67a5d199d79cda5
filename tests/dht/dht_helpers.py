"""Helpers shared by the DHT tests: a few real nodes on 127.0.0.1 with a DHT each."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
from conftest import wait_until

from gossamer.dht import DHT, DHTConfig
from gossamer.node import Node, NodeConfig


def fast_config(**overrides: Any) -> DHTConfig:
    """Test-sized timings: short deadlines, no slow background cycles."""
    values: dict[str, Any] = {
        "op_timeout": 5.0,
        "refresh_interval": 600.0,
        "republish_interval": 600.0,
        "flush_interval": 0.05,
        # small swarms: the join lookup of our own id already finds everyone
        "refresh_buckets_on_join": False,
        "publish_peer_record": False,
    }
    values.update(overrides)
    return DHTConfig(**values)


def loopback(data_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        mdns=False,
    )


START = 1_000_000_000.0  # 2001: far from the real time (see FakeClock)


class FakeClock:
    """Unix time that moves only when told to, for ``DHT(clock=...)``.

    It starts in 2001: a site still reading ``time.time()`` would see every
    record as long expired and fail the test.
    """

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def started(
    data_dir: Path, config: DHTConfig | None = None, clock: Callable[[], float] = time.time
) -> AsyncIterator[Node]:
    """One node with its DHT (``dht_of(node)``)."""
    async with Node(loopback(data_dir)) as node:
        await DHT.start(node, config or fast_config(), clock=clock)
        yield node


class Swarm(list):
    """The nodes of a test swarm, each running in its own task so any one can stop early."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__()
        self._nursery = nursery
        self._stops: dict[str, tuple[trio.CancelScope, trio.Event]] = {}

    async def add(
        self,
        data_dir: Path,
        config: DHTConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Node:
        stopped = trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with started(data_dir, config, clock) as node:
                        task_status.started((node, scope))
                        await trio.sleep_forever()
            finally:
                stopped.set()

        node, scope = await self._nursery.start(run)
        self._stops[node.peer_id] = (scope, stopped)
        self.append(node)
        return node

    async def kill(self, node: Node) -> None:
        """Stop ``node`` without a word to anyone (its sockets just close)."""
        self.remove(node)
        scope, stopped = self._stops.pop(node.peer_id)
        scope.cancel()
        await stopped.wait()


@contextlib.asynccontextmanager
async def chain(
    tmp_path: Path,
    count: int,
    config: DHTConfig | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Swarm]:
    """``count`` nodes, node i connected only to node i-1; tables fill on their own."""
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery)
        for i in range(count):
            node = await swarm.add(tmp_path / f"n{i}", config, clock)
            if len(swarm) > 1:
                await node.connect(swarm[-2].addrs()[0])
        yield swarm
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ CLI + daemons

CLI = [sys.executable, "-m", "gossamer.cli.main"]
LOOPBACK_ARGS = ["--listen", "/ip4/127.0.0.1/tcp/0", "--dataplane-listen", "127.0.0.1:0"]


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["GOSSAMER_HOME"] = str(tmp_path / "default-home")
    return env


async def cli(*args: str | Path, env: dict[str, str], timeout: float = 60.0) -> Any:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*CLI, *map(str, args)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


@contextlib.asynccontextmanager
async def daemon(
    tmp_path: Path, name: str, env: dict[str, str], *extra: str
) -> AsyncIterator[dict]:
    """``gossamer node start`` in a subprocess; yields its control file (pid, peer id ...)."""
    data_dir = tmp_path / name
    err = (tmp_path / f"{name}.err").open("wb")
    process = await trio.lowlevel.open_process(
        [*CLI, "node", "start", "--data-dir", str(data_dir), *LOOPBACK_ARGS, *extra],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=env,
    )

    def control_file() -> dict | None:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited: {(tmp_path / f'{name}.err').read_text()}")
        try:
            return json.loads((data_dir / "control.json").read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or half written
            return None

    try:
        info = await wait_until(control_file, 60, what=f"daemon {name}'s control file")
        yield {**info, "data_dir": data_dir}
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        err.close()


def dht_of(node: Node) -> DHT:
    """The DHT attached to ``node`` (asserting there is one)."""
    dht = node.service(DHT)
    assert dht is not None, f"no DHT attached to {node.peer_id[-8:]}"
    return dht
