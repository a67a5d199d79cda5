"""Circuit relay v2: public nodes relay for private ones; private ones keep reservations.

This module composes the parts and drives them from reachability:

* relay_hop.py -- the hop service of a public node (reservations, circuits, limits);
* relay_client.py -- a private node finding relays and keeping reservations with them;
* relay_circuits.py -- dialing a peer through a relay and accepting a relayed connection;
* relay_addrs.py -- relayed addresses (pure); relay_wire.py -- protocol ids and messages.

:class:`Relays` switches the hop on while reachability is ``public``
(``relay_service = auto``; ``on`` / ``off`` force it), runs the maintenance
loop every ``relay_check_interval`` seconds or at once when reachability or
a reserved relay's connection changes, answers the ``relay.peers`` RPC
("which other relays do you know"), and announces a public relay in the DHT
(provider record for :data:`RELAY_CONTENT_ID`) when a DHT runs.  The DHT is
found as ``node.service(ContentRouting)`` at run time: this layer never imports it.

From py-libp2p 0.8.1 the relay uses the protobuf messages, the
length-prefixed message helpers and the reservation bookkeeping; not
``CircuitV2Protocol``, ``CircuitV2Transport`` or ``RelayDiscovery`` (why:
relay_hop.py and relay_client.py, ``_libp2p_compat.py`` and
docs/nat-traversal.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node.hooks import ContentRouting
from gossamer.node.reachability import PUBLIC, Reachability, Verdict
from gossamer.node.relay_addrs import (
    MAX_RELAY_ADDRS,
    parse_circuit,
    target_peer,
    tcp_addr,
    usable_relay_addr,
)
from gossamer.node.relay_circuits import RelayedConnections
from gossamer.node.relay_client import Candidate, RelayClient, rank
from gossamer.node.relay_hop import HopServer
from gossamer.node.relay_wire import RELAY_CONTENT_ID, STOP_PROTOCOL
from gossamer.node.rpc import CallContext, Service, rpc

if TYPE_CHECKING:
    from gossamer.node.node import Node

# Candidate, rank and the address helpers moved out in the split; tests still import
# them from here.
__all__ = [
    "Candidate",
    "RelayExchangeService",
    "Relays",
    "parse_circuit",
    "rank",
    "target_peer",
    "usable_relay_addr",
]

log = logging.getLogger(__name__)


class RelayExchangeService(Service):
    """``relay.peers``: the relays this node knows (so clients find spares)."""

    name = "relay"
    max_request_bytes = 1024

    def __init__(self, relays: Relays) -> None:
        self._relays = relays

    @rpc
    async def peers(self, ctx: CallContext) -> list[dict[str, Any]]:
        return [
            {"peer_id": c.peer_id, "addrs": c.addrs[:MAX_RELAY_ADDRS]}
            for c in self._relays.known_relays(exclude={ctx.peer_id})
        ][:16]


class Relays:
    """Hop server + reservation client + relayed dialing, driven by reachability."""

    def __init__(self, node: Node, reachability: Reachability) -> None:
        self._node = node
        self._reachability = reachability
        self.server = HopServer(node)
        self.client = RelayClient(node, reachability)
        self.connections = RelayedConnections(node, self.client)
        self._wake = trio.Event()
        self._provided = False

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        node = self._node
        node.host.set_stream_handler(STOP_PROTOCOL, self.connections.handle_stop)
        node.register(RelayExchangeService(self))
        node.add_connection_listener(self._on_connection)
        self._reachability.subscribe(self._on_verdict)
        self.client.add_configured()
        self._apply_service(self._reachability.verdict)
        node.nursery.start_soon(self._run)

    def _on_verdict(self, verdict: Verdict) -> None:
        self._apply_service(verdict)
        self._wake.set()

    def _apply_service(self, verdict: Verdict) -> None:
        mode = self._node.config.relay_service
        want = mode == "on" or (mode == "auto" and verdict.status == PUBLIC)
        if want:
            self.server.enable()
        else:
            self.server.disable()

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if connected:
            return
        self.server.forget(peer_id)
        if peer_id in self.client.reservations:
            self.client.drop(peer_id, "relay disconnected")
            self._wake.set()

    # ----------------------------------------------------------------- status

    def circuit_addrs(self) -> list[str]:
        return self.client.circuit_addrs()

    def status(self) -> dict[str, Any]:
        return {"service": self.server.status(), **self.client.status()}

    def known_relays(self, exclude: set[str]) -> list[Candidate]:
        """Relays this node knows (itself included when it serves), for the exchange."""
        out = []
        if self.server.enabled:
            own = [
                a.rpartition("/p2p/")[0]
                for a in self._node.addrs()
                if "/p2p-circuit" not in a and tcp_addr(a.rpartition("/p2p/")[0])
            ]
            if own:
                out.append(Candidate(self._node.peer_id, own))
        out.extend(self.client.known(exclude))
        return out

    # ------------------------------------------------------------- dialing

    async def dial(self, peer_id: str, addr: str) -> None:
        """Connect to ``peer_id`` through the relay named in ``addr``."""
        await self.connections.dial(peer_id, addr)

    # -------------------------------------------------------------- main loop

    async def _run(self) -> None:
        config = self._node.config
        while True:
            self._wake = trio.Event()
            try:
                await self._step()
            except Exception:  # keep maintaining whatever happened
                log.warning("relay maintenance failed", exc_info=True)
            with trio.move_on_after(config.relay_check_interval):
                await self._wake.wait()

    async def _step(self) -> None:
        node = self._node
        routing = node.service(ContentRouting)
        if self.server.enabled and not self._provided and routing is not None:
            try:
                await routing.provide(RELAY_CONTENT_ID, timeout=5.0)
                self._provided = True
            except Exception as exc:  # no DHT peers yet: next round
                log.debug("announcing the relay in the DHT failed: %r", exc)
        await self.client.step()
