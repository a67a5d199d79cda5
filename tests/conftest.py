"""Shared fixtures: real nodes on 127.0.0.1, each with its own data dir."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gossamer.node.config import NodeConfig
from gossamer.node.node import Node

logging.getLogger("gossamer").setLevel(logging.INFO)


def loopback_config(data_dir: Path, **overrides: Any) -> NodeConfig:
    """A node config that never leaves 127.0.0.1."""
    config = NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        mdns=False,
    )
    return config.replace(**overrides)


@pytest.fixture
def node_config(tmp_path: Path) -> Callable[..., NodeConfig]:
    counter = iter(range(1000))

    def make(name: str | None = None, **overrides: Any) -> NodeConfig:
        return loopback_config(tmp_path / (name or f"node{next(counter)}"), **overrides)

    return make


@contextlib.asynccontextmanager
async def running_nodes(configs: list[NodeConfig]) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(c)) for c in configs]
        yield nodes


@pytest.fixture
def nodes(node_config: Callable[..., NodeConfig]) -> Callable[..., Any]:
    """``async with nodes(3) as (a, b, c):`` starts three loopback nodes."""

    def start(count: int, **overrides: Any):
        return running_nodes([node_config(**overrides) for _ in range(count)])

    return start
