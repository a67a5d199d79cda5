"""The usual stack on a node: the DHT, then the run documents — assembled in one place.

Every caller that needs "a node that can find peers and replicate runs" (the
SDK, the diffusion workflow, the experts CLI, the benches) goes through
:func:`attach_stack` (on a node it already runs) or :func:`open_stack` (a node
of its own for the duration of a block), so the order of the services, what
is optional and what a failure means are decided once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gossamer.crdt.options import SyncOptions
from gossamer.crdt.sync import CrdtService
from gossamer.dht import DHT, DHTConfig
from gossamer.node import GossamerError

if TYPE_CHECKING:
    from gossamer.node import Node, NodeConfig

log = logging.getLogger(__name__)


async def attach_stack(
    node: Node,
    *,
    dht: bool = True,
    dht_config: DHTConfig | None = None,
    dht_optional: bool = False,
    crdt: bool = True,
    options: SyncOptions | None = None,
    resume: bool = True,
) -> CrdtService | None:
    """Start the DHT (unless ``dht`` is false or one is attached) and the run-document
    service (unless ``crdt`` is false) on a running ``node``; return the service.

    ``dht_optional``: a DHT that fails to start is logged and skipped (it only helps
    discovery when every peer is reached through bootstrap addresses).  ``resume``:
    reopen the runs stored under the node's data directory.
    """
    if dht and node.service(DHT) is None:
        try:
            await DHT.start(node, dht_config)
        except GossamerError as exc:
            if not dht_optional:
                raise
            log.info("running without the DHT: %s", exc)
    if not crdt:
        return None
    return await CrdtService.start(node, options, resume=resume)


@contextlib.asynccontextmanager
async def open_stack(
    config: NodeConfig,
    *,
    dht: bool = True,
    dht_config: DHTConfig | None = None,
    crdt: bool = True,
    options: SyncOptions | None = None,
    resume: bool = False,
) -> AsyncIterator[Node]:
    """A node of its own with the stack of :func:`attach_stack`, stopped on exit."""
    from gossamer.node import Node

    async with Node(config) as node:
        await attach_stack(
            node, dht=dht, dht_config=dht_config, crdt=crdt, options=options, resume=resume
        )
        yield node


__all__ = ["attach_stack", "open_stack"]
