"""The circuit relay v2 hop: serving reservations and circuits for other peers, within limits.

On by default only while the node's reachability is ``public``
(``relay_service = auto``; ``on`` / ``off`` force it; the switch is in
relay.py).  Limits: ``relay_max_reservations`` reservations,
``relay_max_circuits`` concurrent circuits per reserved peer, and per circuit
``relay_circuit_duration`` seconds and ``relay_circuit_bytes`` bytes (both
directions together); the reservation ttl is ``relay_reservation_ttl``.  A
relay refuses requests that arrive over a relayed connection (no relay
chains), and forgets the reservation of a peer that disconnects.  It carries
only the end-to-end Noise ciphertext of the connection inside a circuit.

From py-libp2p 0.8.1 this uses the reservation bookkeeping
(``RelayResourceManager``: signed vouchers, ttl, limits) but not
``CircuitV2Protocol``: its hop keys circuits by peer id (two circuits of one
peer tear each other down), its relay loop treats yamux's end of stream as an
error (three logged retries with sleeps per closed circuit), and a
disconnected peer's reservation keeps its slot until the ttl ends
(reproduced).  See ``_libp2p_compat.py`` and docs/nat-traversal.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import _libp2p_compat as compat
from gossamer.node.errors import GossamerError, ProtocolError
from gossamer.node.host import raw_stream_kind, raw_stream_peer
from gossamer.node.identity import peer_id_from_bytes, peer_id_to_bytes
from gossamer.node.relay_addrs import MAX_RELAY_ADDRS, tcp_addr
from gossamer.node.relay_wire import (
    HOP_PROTOCOL,
    MESSAGE_TIMEOUT_S,
    STOP_PROTOCOL,
    RelayError,
    StatusCode,
    read_msg,
    reset_quietly,
    status_name,
    write_msg,
)

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

PUMP_CHUNK = 1 << 16


class HopServer:
    """The relay side: reservations and circuits, with limits."""

    def __init__(self, node: Node) -> None:
        self._node = node
        config = node.config
        self.limits = compat.RelayLimitsSpec(
            duration=int(config.relay_circuit_duration),
            data=int(config.relay_circuit_bytes),
            max_circuit_conns=config.relay_max_circuits,
            max_reservations=config.relay_max_reservations,
            reservation_ttl=int(config.relay_reservation_ttl),
        )
        self._resources = node.host.relay_reservations(self.limits)
        self.enabled = False
        self.circuits = 0
        self.circuits_total = 0
        self.bytes_relayed = 0
        self.refused = 0

    def enable(self) -> None:
        if not self.enabled:
            self._node.host.set_stream_handler(HOP_PROTOCOL, self._handle)
            self.enabled = True
            self._node.nursery.start_soon(self._node.host.push_identify)
            log.info("serving as a circuit relay (limits: %s)", self.limits)

    def disable(self) -> None:
        if self.enabled:
            self._node.host.remove_stream_handler(HOP_PROTOCOL)
            self.enabled = False
            self._node.nursery.start_soon(self._node.host.push_identify)
            log.info("stopped serving as a circuit relay")

    def forget(self, peer_id: str) -> None:
        """A peer disconnected: its reservation ends with its connection.

        Defect (not in the notes): py-libp2p's RelayResourceManager keeps a
        disconnected peer's reservation, and counts it against
        max_reservations, until its ttl (1 h by default) runs out.
        """
        self._resources.forget(peer_id)

    def status(self) -> dict[str, Any]:
        self._resources.clean_expired()
        return {
            "enabled": self.enabled,
            "reservations": len(self._resources),
            "circuits": self.circuits,
            "circuits_total": self.circuits_total,
            "bytes_relayed": self.bytes_relayed,
            "refused": self.refused,
            "limits": {
                "reservations": self.limits.max_reservations,
                "circuits_per_peer": self.limits.max_circuit_conns,
                "circuit_duration_s": self.limits.duration,
                "circuit_bytes": self.limits.data,
            },
        }

    async def _status(self, stream: Any, code: int, **fields: Any) -> None:
        pb = compat.circuit_pb()
        await write_msg(stream, pb.HopMessage(type=pb.HopMessage.STATUS, status=code, **fields))

    async def _handle(self, stream: Any) -> None:
        pb = compat.circuit_pb()
        peer = raw_stream_peer(stream)
        try:
            if raw_stream_kind(stream) == "relayed":
                self.refused += 1
                await self._status(stream, StatusCode.PERMISSION_DENIED)
                await stream.close()
                return
            message = await read_msg(stream, pb.HopMessage)
            if message.type == pb.HopMessage.RESERVE:
                await self._reserve(stream, peer)
            elif message.type == pb.HopMessage.CONNECT:
                await self._connect(stream, peer, message)
            else:
                await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
                await stream.close()
        except ProtocolError as exc:  # its bytes were not a hop message
            self._node.misbehaved(log, peer, 10, "relay request from %s: %s", peer[-8:], exc)
            await reset_quietly(stream)
        except EOFError:  # it went away before asking
            await reset_quietly(stream)
        except (trio.TooSlowError, OSError, ValueError, GossamerError) as exc:
            self._node.complaints.log(log, peer, "relay request from %s failed: %r", peer[-8:], exc)
            await reset_quietly(stream)
        except Exception as exc:  # py-libp2p stream errors come in many types
            self._node.complaints.log(
                log, peer, "relay request from %s failed: %s", peer[-8:], type(exc).__name__
            )
            await reset_quietly(stream)

    def _public_addrs(self) -> list[bytes]:
        import multiaddr

        out = []
        for addr in self._node.addrs():
            if "/p2p-circuit" in addr:
                continue
            bare = addr.rpartition("/p2p/")[0] if "/p2p/" in addr else addr
            if tcp_addr(bare):  # each client keeps what suits its scope
                out.append(multiaddr.Multiaddr(addr).to_bytes())
        return out[:MAX_RELAY_ADDRS]

    async def _reserve(self, stream: Any, peer: str) -> None:
        pb = compat.circuit_pb()
        resources = self._resources
        existing = resources.get(peer)
        if existing is not None:
            resources.refresh(peer)
        elif not resources.can_accept(peer):
            self.refused += 1
            await self._status(stream, StatusCode.RESERVATION_REFUSED)
            await stream.close()
            return
        else:
            resources.reserve(peer)
        reservation = resources.get(peer)
        if reservation is None:
            raise RelayError("reservation vanished")
        reservation.addrs = self._public_addrs()
        await self._status(
            stream,
            StatusCode.OK,
            reservation=reservation.to_proto(),
            limit=pb.Limit(duration=self.limits.duration, data=self.limits.data),
        )
        await stream.close()
        log.debug("reservation for %s (%d held)", peer[-8:], len(resources))

    async def _connect(self, stream: Any, source: str, message: Any) -> None:
        pb = compat.circuit_pb()
        try:
            target = peer_id_from_bytes(message.peer.id)
        except Exception:  # malformed peer id bytes
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
            await stream.close()
            return
        reservation = self._resources.get(target)
        if reservation is None or not self._node.is_connected(target):
            self.refused += 1
            await self._status(stream, StatusCode.NO_RESERVATION)
            await stream.close()
            return
        if reservation.active_connections >= self.limits.max_circuit_conns:
            self.refused += 1
            await self._status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            await stream.close()
            return
        limit = pb.Limit(duration=self.limits.duration, data=self.limits.data)
        reservation.active_connections += 1
        self.circuits += 1
        self.circuits_total += 1
        far: Any = None
        try:
            try:
                with trio.fail_after(MESSAGE_TIMEOUT_S):
                    far = await self._node.host.new_stream(target, STOP_PROTOCOL)
                await write_msg(
                    far,
                    pb.StopMessage(
                        type=pb.StopMessage.CONNECT,
                        peer=pb.PeerId(id=peer_id_to_bytes(source)),
                        limit=limit,
                    ),
                )
                answer = await read_msg(far, pb.StopMessage)
            except Exception as exc:  # the target vanished or spoke nonsense
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                raise RelayError(f"target {target[-8:]} did not accept: {exc!r}") from None
            if answer.type != pb.StopMessage.STATUS or answer.status != StatusCode.OK:
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                raise RelayError(f"target {target[-8:]} refused: {status_name(answer.status)}")
            await self._status(stream, StatusCode.OK, limit=limit)
            log.debug("circuit %s -> %s open", source[-8:], target[-8:])
            await self._pump(stream, far)
        finally:
            reservation.active_connections = max(0, reservation.active_connections - 1)
            self.circuits -= 1
            await reset_quietly(stream)
            if far is not None:
                await reset_quietly(far)

    async def _pump(self, a: Any, b: Any) -> None:
        """Copy bytes both ways until one side ends or a limit is hit.

        Replaces CircuitV2Protocol._relay_data, whose circuits are keyed by
        peer id (a second circuit of the same peer tears down the first's
        streams on exit) and whose reader treats yamux's StreamEOF as an
        unexpected error (three logged retries with sleeps per closed circuit).
        """
        budget = [self.limits.data]

        async def one_way(src: Any, dst: Any, done: trio.CancelScope) -> None:
            try:
                while True:
                    data = await compat.read_until_eof(src, PUMP_CHUNK)
                    if not data:
                        break
                    budget[0] -= len(data)
                    if budget[0] < 0:
                        log.info("circuit hit its %d-byte limit", self.limits.data)
                        break
                    await dst.write(data)
                    self.bytes_relayed += len(data)
            except Exception as exc:  # a reset or closed side ends the circuit
                log.debug("circuit side ended: %r", exc)
            finally:
                done.cancel()

        with trio.move_on_after(self.limits.duration or float("inf")) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one_way, a, b, nursery.cancel_scope)
                nursery.start_soon(one_way, b, a, nursery.cancel_scope)
        if timer.cancelled_caught:
            log.info("circuit hit its %d s limit", self.limits.duration)
