"""Run one node in the foreground until SIGINT or SIGTERM, with its control API.

``gossamer node start`` calls :func:`run`.  The order of things is what makes
shutdown clean:

* signals are received through ``trio.open_signal_receiver`` from before the
  node starts, so a SIGTERM during start-up still leads to an orderly stop
  instead of the default "die now";
* a signal sets an event; it does not cancel a scope around the node.  The
  node is left through a normal ``async with`` exit: the control API stops
  and removes its control file first (a client never talks to a half-stopped
  node), then the node closes its services, connections and listeners.
  (Cancelling a scope that encloses a py-libp2p host cancels its connection
  tasks before the host closes them, and their sockets leak: measured with
  ``-W always::ResourceWarning``.)
* a second signal during that shutdown exits at once (status 1) for the
  operator whose shutdown is stuck.

One daemon per data directory: a ``daemon.lock`` file held with ``flock``
for the daemon's lifetime (the kernel drops it when the process dies, so
there is no stale lock to clean up).

Upper layers (dht, crdt, training) cannot be imported here (``node/`` is the
bottom layer); the CLI passes them in as ``extensions``: coroutines that
attach services and control methods to the started node.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import trio

from gossamer.node.config import NodeConfig
from gossamer.node.control import ControlServer
from gossamer.node.errors import GossamerError
from gossamer.node.node import Node

log = logging.getLogger(__name__)

LOCK_FILE_NAME = "daemon.lock"

Extension = Callable[[Node], Awaitable[None]]
ReadyCallback = Callable[[Node, ControlServer], None]


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's daemon lock, or raise GossamerError if another daemon has it."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GossamerError(f"another daemon is already running in {data_dir}") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


async def serve(
    config: NodeConfig,
    stop: trio.Event,
    *,
    extensions: Sequence[Extension] = (),
    ready: ReadyCallback | None = None,
) -> None:
    """Start the node and its control API, call ``ready``, serve until ``stop`` is set."""
    async with Node(config) as node:
        for extension in extensions:
            await extension(node)
        async with trio.open_nursery() as nursery:
            server = ControlServer(
                node.control_methods,
                config.data_dir,
                peer_id=node.peer_id,
                port=config.control_port,
            )
            await nursery.start(server.run)
            if ready is not None:
                ready(node, server)
            await stop.wait()
            nursery.cancel_scope.cancel()  # only the control server lives in this nursery
        log.info("stopping")


async def _watch_signals(signals: trio.abc.ReceiveChannel[int], stop: trio.Event) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("%s received: stopping (send it again to exit at once)", name)
            stop.set()
        else:
            log.error("%s received again: exiting without a clean shutdown", name)
            os._exit(1)


async def run_until_signal(
    config: NodeConfig,
    *,
    extensions: Sequence[Extension] = (),
    ready: ReadyCallback | None = None,
) -> None:
    """:func:`serve` until SIGINT or SIGTERM, then shut down cleanly and return."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stop)
            await serve(config, stop, extensions=extensions, ready=ready)
            nursery.cancel_scope.cancel()
    log.info("stopped")


def run(
    config: NodeConfig,
    *,
    extensions: Sequence[Extension] = (),
    ready: ReadyCallback | None = None,
) -> None:
    """Blocking entry point: lock the data dir and run the daemon until a signal."""
    with data_dir_lock(config.data_dir):
        trio.run(functools.partial(run_until_signal, config, extensions=extensions, ready=ready))
