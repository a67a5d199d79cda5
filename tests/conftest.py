"""Shared fixtures: real nodes on 127.0.0.1, each with its own data dir; and
:func:`wait_until`, the one way a test waits for a condition
(``from conftest import wait_until`` works from every test directory).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from gossamer.node import Node, NodeConfig

logging.getLogger("gossamer").setLevel(logging.INFO)

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy; return that.

    ``predicate`` may be a coroutine function (or return an awaitable): it is
    awaited, and a pending call is cancelled at the deadline.  An exception from
    it propagates at once (a child process that died should fail the test, not
    be polled for ``timeout`` seconds).  On timeout: AssertionError naming
    ``what`` and the last value seen, so a failure says how far things got.
    """
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


def wait_until_sync(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """:func:`wait_until` for synchronous tests (the NAT lab drives its nodes from threads)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; last value: {last!r}"
            )
        time.sleep(interval)


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
