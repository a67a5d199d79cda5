"""Relayed connections at their two ends: dialing a peer through a relay, accepting one from it.

Dialing ``…/p2p-circuit/p2p/<peer>`` (``node.connect`` / ``ensure_connected``
with such an address) opens a HOP CONNECT through the relay and runs Noise +
Yamux inside the circuit; the peer's STOP handler accepts it, only from
relays it holds a reservation with.  The hole puncher then tries to make the
connection direct (holepunch.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gossamer.node import _libp2p_compat as compat
from gossamer.node.errors import PeerUnreachable
from gossamer.node.host import raw_stream_peer
from gossamer.node.identity import peer_id_from_bytes, peer_id_to_bytes
from gossamer.node.relay_addrs import parse_circuit
from gossamer.node.relay_wire import (
    HOP_PROTOCOL,
    StatusCode,
    read_msg,
    reset_quietly,
    status_name,
    write_msg,
)

if TYPE_CHECKING:
    from gossamer.node.node import Node
    from gossamer.node.relay_client import RelayClient

log = logging.getLogger(__name__)


class RelayedConnections:
    """Outgoing circuits (HOP CONNECT) and incoming ones (STOP) of this node."""

    def __init__(self, node: Node, client: RelayClient) -> None:
        self._node = node
        self._client = client  # whose reservations say which relays may bring connections
        self.connect_ms: list[float] = []  # recent relayed-dial times

    async def dial(self, peer_id: str, addr: str) -> None:
        """Connect to ``peer_id`` through the relay named in ``addr``."""
        pb = compat.circuit_pb()
        parsed = parse_circuit(addr)
        if parsed is None or parsed[2] != peer_id:
            raise PeerUnreachable(f"{addr} is not a relayed address of {peer_id[-8:]}")
        relay_addr, relay_id, _ = parsed
        node = self._node
        if relay_id == node.peer_id or relay_id == peer_id:
            raise PeerUnreachable("refusing to relay through ourselves or the target")
        start = time.perf_counter()
        if not node.is_connected(relay_id):
            if not relay_addr:
                raise PeerUnreachable(f"no address for relay {relay_id[-8:]}")
            import multiaddr

            # Not node.connect(): this runs inside the node's dial limiter
            # already, and taking a second slot could deadlock a full one.
            node.peers.add_addrs(relay_id, [f"{relay_addr}/p2p/{relay_id}"])
            await node.dial_addresses(relay_id, [multiaddr.Multiaddr(relay_addr)])
        stream = await node.host.new_stream(relay_id, HOP_PROTOCOL)
        try:
            await write_msg(
                stream,
                pb.HopMessage(
                    type=pb.HopMessage.CONNECT,
                    peer=pb.PeerId(id=peer_id_to_bytes(peer_id)),
                ),
            )
            answer = await read_msg(stream, pb.HopMessage)
            if answer.type != pb.HopMessage.STATUS or answer.status != StatusCode.OK:
                raise PeerUnreachable(
                    f"relay {relay_id[-8:]} could not connect us to {peer_id[-8:]}: "
                    f"{status_name(answer.status)}"
                )
            await node.host.upgrade_relayed_stream(stream, peer_id, relay_id, True)
        except BaseException:
            await reset_quietly(stream)
            raise
        elapsed = (time.perf_counter() - start) * 1000
        self.connect_ms = [*self.connect_ms[-31:], elapsed]
        log.info(
            "connected to %s through relay %s in %.0f ms", peer_id[-8:], relay_id[-8:], elapsed
        )

    async def handle_stop(self, stream: Any) -> None:
        """A relay brings us a connection: accept it (from relays we reserved with)."""
        pb = compat.circuit_pb()
        relay_id = raw_stream_peer(stream)
        try:
            message = await read_msg(stream, pb.StopMessage)
            if message.type != pb.StopMessage.CONNECT:
                await write_msg(
                    stream,
                    pb.StopMessage(
                        type=pb.StopMessage.STATUS, status=StatusCode.UNEXPECTED_MESSAGE
                    ),
                )
                await reset_quietly(stream)
                return
            if relay_id not in self._client.reservations:
                await write_msg(
                    stream,
                    pb.StopMessage(type=pb.StopMessage.STATUS, status=StatusCode.PERMISSION_DENIED),
                )
                await reset_quietly(stream)
                return
            source = peer_id_from_bytes(message.peer.id)
            await write_msg(
                stream, pb.StopMessage(type=pb.StopMessage.STATUS, status=StatusCode.OK)
            )
            conn = await self._node.host.upgrade_relayed_stream(stream, source, relay_id, False)
        except Exception as exc:  # malformed, timed out, or the upgrade failed
            # the source behind the relay chooses what we see here: once a minute per relay
            self._node.complaints.log(
                log, relay_id, "relayed connection via %s failed: %s", relay_id[-8:],
                type(exc).__name__,
            )  # fmt: skip
            await reset_quietly(stream)
            return
        log.info("accepted a connection from %s through relay %s", source[-8:], relay_id[-8:])
        # py-libp2p keeps a stream alive only while its handler runs.
        await conn.wait_closed()
