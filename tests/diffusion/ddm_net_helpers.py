"""Helpers for the diffusion network tests: tiny experts, loopback nodes, subprocess servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import trio

from gossamer.crdt import open_stack
from gossamer.dht import DHTConfig
from gossamer.node import Node, NodeConfig
from gossamer.training.diffusion import ExpertSpec, Router, expert_to_bytes

SHAPE = (1, 8, 8)
TINY = ExpertSpec("mlp", {"hidden": 32, "depth": 1, "time_dim": 16})
CLI = [sys.executable, "-m", "gossamer.cli.main"]


def loopback(data_dir: Path, **overrides: Any) -> NodeConfig:
    config = NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        mdns=False,
    )
    return config.replace(**overrides)


def fast_dht() -> DHTConfig:
    return DHTConfig(
        op_timeout=5.0,
        flush_interval=0.05,
        refresh_buckets_on_join=False,
        publish_peer_record=False,
    )


@contextlib.asynccontextmanager
async def ddm_node(data_dir: Path, *, dht: bool = True) -> AsyncIterator[Node]:
    """A loopback node with a DHT (test timings) and run documents."""
    async with open_stack(loopback(data_dir), dht=dht, dht_config=fast_dht()) as node:
        yield node


def tiny_expert(seed: int, spec: ExpertSpec = TINY) -> tuple[torch.nn.Module, bytes]:
    """A randomly initialised expert (mechanics need no training) and its checkpoint bytes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build(SHAPE).eval()
    return model, expert_to_bytes(model, spec, SHAPE)


def with_cluster(blob: bytes, cluster: int) -> bytes:
    """The checkpoint with a ``gossamer_ddm`` metadata entry naming its cluster."""
    from safetensors.torch import load, save

    from gossamer.training.diffusion.models import safetensors_metadata
    from gossamer.training.diffusion.serving import DDM_META_KEY

    meta = dict(safetensors_metadata(blob))
    meta[DDM_META_KEY] = json.dumps({"cluster": cluster})
    return save(load(blob), metadata=meta)


def tiny_router(k: int, seed: int = 99) -> Router:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Router(SHAPE, k, hidden=32, depth=1).eval()


class ServerProcess:
    """``gossamer experts serve`` in a child process; ``ready`` is its JSON ready line."""

    def __init__(self, proc: subprocess.Popen[str], ready: dict[str, Any]) -> None:
        self.proc = proc
        self.ready = ready
        self.peer_id: str = ready["peer_id"]
        self.addr: str = ready["addrs"][0]

    def kill(self) -> None:
        """SIGKILL: the host vanishes without a goodbye."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn_server(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [
            *CLI,
            "experts",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--dataplane-listen",
            "127.0.0.1:0",
            "--control-port",
            "0",
            "--json",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


async def wait_ready(procs: list[subprocess.Popen[str]], timeout: float = 40.0) -> list[Any]:
    """Read each child's ready line (in worker threads, so the test's nodes keep serving)."""
    out: list[Any] = [None] * len(procs)

    async def read(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        if not line:
            raise RuntimeError(f"server {i} exited before it was ready (rc {proc.poll()})")
        out[i] = ServerProcess(proc, json.loads(line))

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for i, proc in enumerate(procs):
                nursery.start_soon(read, i, proc)
    return out
