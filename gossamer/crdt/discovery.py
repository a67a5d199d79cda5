"""Finding a run's members through the node's DHT, when one is attached.

A narrow use of the node's DHT (``node.service(DHT)``): announce that we replicate
a run, and find who else does.  The DHT is an optimisation here, never a requirement — everything
works without it, given bootstrap addresses — so failures are logged, not
raised.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import trio

from gossamer.dht import DHT

if TYPE_CHECKING:
    from gossamer.node import Node

log = logging.getLogger(__name__)


def run_content_id(run_id: str) -> str:
    return hashlib.sha256(b"gossamer/run/" + run_id.encode()).hexdigest()


async def announce_run(node: Node, run_id: str) -> None:
    dht = node.service(DHT)
    if dht is None:
        return
    try:
        with trio.move_on_after(5.0):
            await dht.provide(run_content_id(run_id))
    except Exception as exc:  # the DHT is an optimisation here, never a requirement
        log.info("run %s: DHT announce failed: %s", run_id, exc)


async def find_run_peers(node: Node, run_id: str) -> list[str]:
    dht = node.service(DHT)
    if dht is None:
        return []
    try:
        with trio.move_on_after(5.0):
            providers = await dht.find_providers(run_content_id(run_id))
            out = []
            for provider in providers:
                peer = getattr(provider, "peer_id", provider)
                if isinstance(peer, str) and peer != node.peer_id:
                    out.append(peer)
            return out
    except Exception as exc:
        log.info("run %s: DHT lookup failed: %s", run_id, exc)
    return []
