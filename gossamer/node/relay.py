"""Circuit relay v2: public nodes relay for private ones; private ones keep reservations.

Wire format: the libp2p circuit relay v2 spec (``/libp2p/circuit/relay/0.2.0/hop``
and ``.../stop``, py-libp2p's protobuf messages), so the relay sees only the
end-to-end Noise ciphertext of the connection it carries.

**Hop (the relay).**  On by default only while the node's reachability is
``public`` (``relay_service = auto``; ``on`` / ``off`` force it).  Limits:
``relay_max_reservations`` reservations, ``relay_max_circuits`` concurrent
circuits per reserved peer, and per circuit ``relay_circuit_duration``
seconds and ``relay_circuit_bytes`` bytes (both directions together); the
reservation ttl is ``relay_reservation_ttl``.  A relay refuses requests that
arrive over a relayed connection (no relay chains), and forgets the
reservation of a peer that disconnects.  A public relay announces itself in
the DHT (provider record for :data:`RELAY_CONTENT_ID`) when a DHT runs.

**Client (private nodes).**  While reachability is ``private`` the node
keeps ``relay_reservations`` reservations on the best relays it knows:
candidates come from ``relays`` and ``bootstrap`` in the config, from
connected peers whose identify lists the hop protocol, from the relays
themselves (the ``relay.peers`` RPC: "which other relays do you know"), and
from the DHT.  Best = fewest recent failures, then lowest round trip.  Every
``relay_check_interval`` seconds each reserved relay is pinged; a relay that
disconnects or stops answering is dropped at once and replaced; a
reservation is renewed before it expires.  Each reservation adds
``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`` to ``node.addrs()`` and
the node re-publishes its peer record in the DHT when that list changes.

Dialing ``…/p2p-circuit/p2p/<peer>`` (``node.connect`` / ``ensure_connected``
with such an address) opens a HOP CONNECT through the relay and runs Noise +
Yamux inside the circuit; the peer's STOP handler accepts it.  The hole
puncher then tries to make the connection direct (holepunch.py).

From py-libp2p 0.8.1 this module uses the protobuf messages, the
length-prefixed message helpers and the reservation bookkeeping
(``RelayResourceManager``: signed vouchers, ttl, limits).  It does *not* use
``CircuitV2Protocol``, ``CircuitV2Transport`` or ``RelayDiscovery``: the hop
keys circuits by peer id (two circuits of one peer tear each other down), its
relay loop treats yamux's end of stream as an error (three logged retries
with sleeps per closed circuit), a disconnected peer's reservation keeps its
slot until the ttl ends (reproduced), the transport reserves before every
CONNECT and discovery runs every 300 s (LIBP2P-NOTES pitfall 8).  See
``_libp2p_compat.py`` and docs/nat-traversal.md.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import _libp2p_compat as compat
from gossamer.node.errors import GossamerError, PeerUnreachable
from gossamer.node.reachability import PRIVATE, PUBLIC, Verdict, is_public_ip
from gossamer.node.rpc import CallContext, Service, rpc

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger("gossamer.node.relay")

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
RELAY_CONTENT_ID = "relay-v2"  # DHT provider record of public relays
MESSAGE_TIMEOUT_S = 10.0
PUMP_CHUNK = 1 << 16
MAX_RELAY_ADDRS = 8
MAX_CANDIDATES = 64
RENEW_MARGIN = 0.25  # renew when this fraction of the ttl is left


class RelayError(GossamerError):
    """A relay refused or failed a reservation or a circuit."""


# ----------------------------------------------------------- addresses (pure)


def parse_circuit(addr: str) -> tuple[str, str, str] | None:
    """``(relay transport addr, relay id, target id)`` of a relayed address, or None."""
    head, sep, tail = addr.partition("/p2p-circuit")
    if not sep or not tail.startswith("/p2p/"):
        return None
    target = tail[len("/p2p/") :].split("/")[0]
    relay_addr, p2p, relay_id = head.rpartition("/p2p/")
    if not p2p or not relay_id or not target or "/" in relay_id:
        return None
    return relay_addr, relay_id, target


def target_peer(addr: str) -> str | None:
    """The peer an address leads to: the last ``/p2p/<id>`` component."""
    _, sep, rest = addr.rpartition("/p2p/")
    return rest.split("/")[0] if sep and rest else None


def usable_relay_addr(addr: str, scope: str = "public") -> bool:
    """A relay transport address worth advertising (pure).

    TCP at a public IP; with ``scope`` = ``"loopback"`` or ``"lan"`` (we reach
    the relay itself at such an address) also addresses of that scope, so
    relays work on one machine or one LAN too.
    """
    parts = addr.split("/")
    if (
        len(parts) < 5
        or parts[1] not in ("ip4", "ip6")
        or parts[3] != "tcp"
        or "/p2p-circuit" in addr
    ):
        return False
    return ip_scope(parts[2]) in ("public", scope)


def ip_scope(ip: str) -> str:
    """``public``, ``loopback``, ``lan`` or ``none`` (unspecified, malformed)."""
    if is_public_ip(ip):
        return "public"
    if ip.startswith("127.") or ip == "::1":
        return "loopback"
    if ip in ("0.0.0.0", "::") or (":" not in ip and ip.count(".") != 3):
        return "none"
    return "lan"


def tcp_addr(addr: str) -> bool:
    """A dialable-looking TCP multiaddr (any scope but unspecified)."""
    parts = addr.split("/")
    return (
        len(parts) >= 5
        and parts[1] in ("ip4", "ip6")
        and parts[3] == "tcp"
        and ip_scope(parts[2]) != "none"
        and "/p2p-circuit" not in addr
    )


# ------------------------------------------------------------ ranking (pure)


@dataclass
class Candidate:
    """A relay we might reserve with."""

    peer_id: str
    addrs: list[str] = field(default_factory=list)  # transport addrs, no /p2p suffix
    sources: set[str] = field(default_factory=set)  # config, bootstrap, identify, exchange, dht
    rtt_ms: float | None = None
    failures: int = 0
    retry_at: float = 0.0  # monotonic time before which we do not try it again

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "sources": sorted(self.sources),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
            "failures": self.failures,
        }


def rank(candidates: Iterable[Candidate], now: float, exclude: set[str]) -> list[Candidate]:
    """Usable candidates, best first: fewest failures, then lowest round trip (pure)."""
    usable = [c for c in candidates if c.peer_id not in exclude and c.retry_at <= now]
    return sorted(
        usable,
        key=lambda c: (c.failures, c.rtt_ms if c.rtt_ms is not None else float("inf"), c.peer_id),
    )


def backoff(failures: int) -> float:
    """Seconds before retrying a relay that failed ``failures`` times in a row."""
    return min(300.0, 2.0 * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2)


@dataclass
class Reservation:
    relay_id: str
    relay_addrs: list[str]
    expires_at: float  # wall clock
    limit_duration: int
    limit_data: int
    reserved_at: float = field(default_factory=time.time)
    rtt_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "relay": self.relay_id,
            "relay_addrs": list(self.relay_addrs),
            "expires_in_s": round(self.expires_at - time.time(), 1),
            "limit_duration_s": self.limit_duration,
            "limit_bytes": self.limit_data,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
        }


# ------------------------------------------------------------------- wire


def _pb() -> Any:
    from libp2p.relay.circuit_v2.pb import circuit_pb2

    return circuit_pb2


async def _read(stream: Any, cls: Any) -> Any:
    from libp2p.relay.circuit_v2.utils import read_delimited_msg

    with trio.fail_after(MESSAGE_TIMEOUT_S):
        return await read_delimited_msg(stream, cls)


async def _write(stream: Any, message: Any) -> None:
    from libp2p.relay.circuit_v2.utils import write_delimited_msg

    with trio.fail_after(MESSAGE_TIMEOUT_S):
        await write_delimited_msg(stream, message)


def _status_name(code: int) -> str:
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


async def _reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already gone
        log.debug("reset of a dead relay stream", exc_info=True)


def _peer_of(stream: Any) -> str:
    return stream.muxed_conn.peer_id.to_base58()


# -------------------------------------------------------------------- hop


class HopServer:
    """The relay side: reservations and circuits, with limits."""

    def __init__(self, node: Node) -> None:
        from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager

        self._node = node
        config = node.config
        self.limits = RelayLimits(
            duration=int(config.relay_circuit_duration),
            data=int(config.relay_circuit_bytes),
            max_circuit_conns=config.relay_max_circuits,
            max_reservations=config.relay_max_reservations,
            reservation_ttl=int(config.relay_reservation_ttl),
        )
        self._resources = RelayResourceManager(self.limits, node.host)
        self.enabled = False
        self.circuits = 0
        self.circuits_total = 0
        self.bytes_relayed = 0
        self.refused = 0

    def enable(self) -> None:
        if not self.enabled:
            compat.set_raw_stream_handler(self._node.host, HOP_PROTOCOL, self._handle)
            self.enabled = True
            self._node.nursery.start_soon(compat.push_identify, self._node.host)
            log.info("serving as a circuit relay (limits: %s)", self.limits)

    def disable(self) -> None:
        if self.enabled:
            self._node.host.remove_stream_handler(HOP_PROTOCOL)
            self.enabled = False
            self._node.nursery.start_soon(compat.push_identify, self._node.host)
            log.info("stopped serving as a circuit relay")

    def forget(self, peer_id: str) -> None:
        """A peer disconnected: its reservation ends with its connection.

        Defect (not in the notes): py-libp2p's RelayResourceManager keeps a
        disconnected peer's reservation, and counts it against
        max_reservations, until its ttl (1 h by default) runs out.
        """
        from libp2p.peer.id import ID

        self._resources._reservations.pop(ID.from_base58(peer_id), None)

    def status(self) -> dict[str, Any]:
        self._resources._clean_expired()
        return {
            "enabled": self.enabled,
            "reservations": len(self._resources._reservations),
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
        pb = _pb()
        await _write(stream, pb.HopMessage(type=pb.HopMessage.STATUS, status=code, **fields))

    async def _handle(self, stream: Any) -> None:
        pb = _pb()
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        peer = _peer_of(stream)
        try:
            if compat.stream_kind(stream) == "relayed":
                self.refused += 1
                await self._status(stream, StatusCode.PERMISSION_DENIED)
                await stream.close()
                return
            message = await _read(stream, pb.HopMessage)
            if message.type == pb.HopMessage.RESERVE:
                await self._reserve(stream, peer)
            elif message.type == pb.HopMessage.CONNECT:
                await self._connect(stream, peer, message)
            else:
                await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
                await stream.close()
        except (trio.TooSlowError, OSError, ValueError, GossamerError) as exc:
            log.info("relay request from %s failed: %r", peer[-8:], exc)
            await _reset(stream)
        except Exception as exc:  # py-libp2p stream errors come in many types
            log.info("relay request from %s failed: %r", peer[-8:], exc)
            await _reset(stream)

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
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        pb = _pb()
        peer_id = ID.from_base58(peer)
        resources = self._resources
        existing = resources.get_reservation(peer_id)
        if existing is not None:
            resources.refresh_reservation(peer_id)
        elif not resources.can_accept_reservation(peer_id):
            self.refused += 1
            await self._status(stream, StatusCode.RESERVATION_REFUSED)
            await stream.close()
            return
        else:
            resources.reserve(peer_id)
        reservation = resources.get_reservation(peer_id)
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
        log.debug("reservation for %s (%d held)", peer[-8:], len(resources._reservations))

    async def _connect(self, stream: Any, source: str, message: Any) -> None:
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        pb = _pb()
        try:
            target_id = ID(message.peer.id)
        except Exception:  # malformed peer id bytes
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
            await stream.close()
            return
        target = target_id.to_base58()
        reservation = self._resources.get_reservation(target_id)
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
                    far = await compat.open_raw_stream(self._node.host, target, STOP_PROTOCOL)
                await _write(
                    far,
                    pb.StopMessage(
                        type=pb.StopMessage.CONNECT,
                        peer=pb.PeerId(id=ID.from_base58(source).to_bytes()),
                        limit=limit,
                    ),
                )
                answer = await _read(far, pb.StopMessage)
            except Exception as exc:  # the target vanished or spoke nonsense
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                raise RelayError(f"target {target[-8:]} did not accept: {exc!r}") from None
            if answer.type != pb.StopMessage.STATUS or answer.status != StatusCode.OK:
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                raise RelayError(f"target {target[-8:]} refused: {_status_name(answer.status)}")
            await self._status(stream, StatusCode.OK, limit=limit)
            log.debug("circuit %s -> %s open", source[-8:], target[-8:])
            await self._pump(stream, far)
        finally:
            reservation.active_connections = max(0, reservation.active_connections - 1)
            self.circuits -= 1
            await _reset(stream)
            if far is not None:
                await _reset(far)

    async def _pump(self, a: Any, b: Any) -> None:
        """Copy bytes both ways until one side ends or a limit is hit.

        Replaces CircuitV2Protocol._relay_data, whose circuits are keyed by
        peer id (a second circuit of the same peer tears down the first's
        streams on exit) and whose reader treats yamux's StreamEOF as an
        unexpected error (three logged retries with sleeps per closed circuit).
        """
        from libp2p.network.stream.exceptions import StreamEOF

        budget = [self.limits.data]

        async def one_way(src: Any, dst: Any, done: trio.CancelScope) -> None:
            try:
                while True:
                    try:
                        data = await src.read(PUMP_CHUNK)
                    except StreamEOF:
                        break
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


# -------------------------------------------------------------- exchange


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


# ----------------------------------------------------------------- facade


class Relays:
    """Hop server + reservation client + relayed dialing, driven by reachability."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.server = HopServer(node)
        self.reservations: dict[str, Reservation] = {}
        self.candidates: dict[str, Candidate] = {}
        self._wake = trio.Event()
        self._provided = False
        self._discovered_at = -float("inf")
        self.connect_ms: list[float] = []  # recent relayed-dial times
        self.events: list[str] = []  # recent changes, for status

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        node = self._node
        compat.set_raw_stream_handler(node.host, STOP_PROTOCOL, self._handle_stop)
        node.register(RelayExchangeService(self))
        node.add_connection_listener(self._on_connection)
        node.reachability.subscribe(self._on_verdict)
        for addr in [*node.config.relays, *node.config.bootstrap]:
            self._add_candidate_addr(addr, "config" if addr in node.config.relays else "bootstrap")
        self._apply_service(node.reachability.verdict)
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
        if peer_id in self.reservations:
            self._drop(peer_id, "relay disconnected")
            self._wake.set()

    # ----------------------------------------------------------------- status

    def circuit_addrs(self) -> list[str]:
        me = self._node.peer_id
        out = []
        for reservation in self.reservations.values():
            for addr in reservation.relay_addrs:
                out.append(compat.circuit_addr(addr, reservation.relay_id, me))
        return out

    def status(self) -> dict[str, Any]:
        return {
            "service": self.server.status(),
            "reservations": [r.to_dict() for r in self.reservations.values()],
            "candidates": [
                c.to_dict() for c in rank(self.candidates.values(), float("inf"), set())[:8]
            ],
            "events": self.events[-8:],
        }

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-32]
        log.info("%s", text)

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
        self._refresh_identify_candidates()
        for c in self.candidates.values():
            if c.peer_id not in exclude and c.addrs and c.failures == 0:
                out.append(c)
        return out

    # -------------------------------------------------------------- candidates

    def _add_candidate_addr(self, addr: str, source: str) -> None:
        peer = target_peer(addr)
        if peer is None or "/p2p-circuit" in addr or peer == self._node.peer_id:
            return
        bare = addr.rpartition("/p2p/")[0]
        self._add_candidate(peer, [bare], source)

    def _add_candidate(self, peer_id: str, addrs: Iterable[str], source: str) -> None:
        if peer_id == self._node.peer_id:
            return
        candidate = self.candidates.get(peer_id)
        if candidate is None:
            if len(self.candidates) >= MAX_CANDIDATES:
                return
            candidate = self.candidates[peer_id] = Candidate(peer_id)
        candidate.sources.add(source)
        for addr in addrs:
            if isinstance(addr, str) and tcp_addr(addr) and addr not in candidate.addrs:
                candidate.addrs.append(addr)
        del candidate.addrs[MAX_RELAY_ADDRS:]

    def _refresh_identify_candidates(self) -> None:
        """Connected peers whose identify says they serve the hop protocol."""
        node = self._node
        for peer_id in node.connected_peers():
            if compat.peer_supports(node.host, peer_id, HOP_PROTOCOL):
                remote = node.peer_remote(peer_id)
                addrs = []
                for addr in compat.peerstore_addrs(node.host, peer_id):
                    addrs.append(_substitute_unspecified(addr, remote))
                self._add_candidate(peer_id, addrs, "identify")

    async def _discover(self) -> None:
        """Ask the relays we know for others, and the DHT for providers."""
        node = self._node
        self._discovered_at = time.monotonic()
        self._refresh_identify_candidates()
        asked = 0
        for peer_id in list(self.reservations) + [
            c.peer_id for c in self.candidates.values() if node.is_connected(c.peer_id)
        ]:
            if asked >= 3:
                break
            asked += 1
            try:
                answer = await node.call(peer_id, "relay", "peers", {}, timeout=5.0)
            except GossamerError:
                continue
            for item in answer if isinstance(answer, list) else []:
                if isinstance(item, dict) and isinstance(item.get("peer_id"), str):
                    addrs = item.get("addrs") if isinstance(item.get("addrs"), list) else []
                    self._add_candidate(item["peer_id"][:128], addrs[:MAX_RELAY_ADDRS], "exchange")
        dht = getattr(node, "dht", None)
        if dht is not None:
            try:
                providers = await dht.find_providers(RELAY_CONTENT_ID, timeout=5.0)
            except Exception as exc:  # DHT errors of any kind: discovery is best effort
                log.debug("dht relay lookup failed: %r", exc)
                providers = []
            for provider in providers:
                bare = [a.rpartition("/p2p/")[0] for a in provider.addrs]
                self._add_candidate(provider.peer_id, bare, "dht")

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
        config = node.config
        if self.server.enabled and not self._provided and getattr(node, "dht", None) is not None:
            try:
                await node.dht.provide(RELAY_CONTENT_ID, timeout=5.0)
                self._provided = True
            except Exception as exc:  # no DHT peers yet: next round
                log.debug("announcing the relay in the DHT failed: %r", exc)
        want = (
            node.reachability.status == PRIVATE
            and config.relay_client
            and config.relay_reservations > 0
        )
        if not want:
            for relay_id in list(self.reservations):
                self._drop(relay_id, "not private any more", failed=False)
            return
        await self._check_reservations()
        if len(self.reservations) < config.relay_reservations:
            await self._fill()
        # Keep spares known before a relay dies: ask relays for others now and then.
        spares = rank(self.candidates.values(), time.monotonic(), set(self.reservations))
        interval = config.relay_check_interval * 3
        if len(spares) < config.relay_reservations and (
            time.monotonic() - self._discovered_at > interval
        ):
            await self._discover()

    async def _check_reservations(self) -> None:
        node = self._node
        for relay_id, reservation in list(self.reservations.items()):
            if not node.is_connected(relay_id):
                self._drop(relay_id, "relay disconnected")
                continue
            try:
                rtt = await node.ping(relay_id, timeout=min(5.0, node.config.relay_check_interval))
                reservation.rtt_ms = rtt
                candidate = self.candidates.get(relay_id)
                if candidate is not None:
                    candidate.rtt_ms = rtt
            except GossamerError:
                self._drop(relay_id, "relay stopped answering")
                await node.disconnect(relay_id)
                continue
            ttl = max(1.0, reservation.expires_at - reservation.reserved_at)
            if reservation.expires_at - time.time() < ttl * RENEW_MARGIN:
                try:
                    await self._reserve(relay_id)
                except (RelayError, GossamerError, OSError, trio.TooSlowError) as exc:
                    self._drop(relay_id, f"renewal failed: {exc}")

    async def _fill(self) -> None:
        config = self._node.config
        now = time.monotonic()
        ranked = rank(self.candidates.values(), now, set(self.reservations))
        if len(ranked) < config.relay_reservations - len(self.reservations):
            await self._discover()
            ranked = rank(self.candidates.values(), now, set(self.reservations))
        for candidate in ranked:
            if len(self.reservations) >= config.relay_reservations:
                break
            try:
                await self._reserve_with(candidate)
            except (RelayError, GossamerError, OSError, trio.TooSlowError) as exc:
                candidate.failures += 1
                candidate.retry_at = time.monotonic() + backoff(candidate.failures)
                log.info("reservation with %s failed: %s", candidate.peer_id[-8:], exc)

    async def _reserve_with(self, candidate: Candidate) -> None:
        node = self._node
        if not node.is_connected(candidate.peer_id):
            if not candidate.addrs:
                raise RelayError("no address known")
            node.peers.add_addrs(
                candidate.peer_id, [f"{a}/p2p/{candidate.peer_id}" for a in candidate.addrs]
            )
            await node.ensure_connected(candidate.peer_id)
        await self._reserve(candidate.peer_id)
        candidate.failures = 0

    async def _reserve(self, relay_id: str) -> Reservation:
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        pb = _pb()
        node = self._node
        start = time.perf_counter()
        stream = await compat.open_raw_stream(node.host, relay_id, HOP_PROTOCOL)
        try:
            await _write(stream, pb.HopMessage(type=pb.HopMessage.RESERVE))
            answer = await _read(stream, pb.HopMessage)
        except BaseException:
            await _reset(stream)
            raise
        await stream.close()
        rtt = (time.perf_counter() - start) * 1000
        if answer.type != pb.HopMessage.STATUS or answer.status != StatusCode.OK:
            raise RelayError(f"relay {relay_id[-8:]} refused: {_status_name(answer.status)}")
        remote = node.peer_remote(relay_id)
        scope = ip_scope(remote[0]) if remote else "public"
        candidate = self.candidates.get(relay_id)
        offered = _decode_relay_addrs(answer.reservation.addrs, relay_id)
        if candidate is not None:
            offered += [a for a in candidate.addrs if a not in offered]
        relay_addrs = [a for a in offered if usable_relay_addr(a, scope)][:MAX_RELAY_ADDRS]
        if not relay_addrs:
            raise RelayError(f"relay {relay_id[-8:]} has no public address to advertise")
        expire = float(answer.reservation.expire) or time.time() + 60.0
        is_new = relay_id not in self.reservations
        reservation = Reservation(
            relay_id,
            relay_addrs,
            expire,
            int(answer.limit.duration),
            int(answer.limit.data),
            rtt_ms=rtt,
        )
        self.reservations[relay_id] = reservation
        if candidate is not None:
            candidate.rtt_ms = rtt if candidate.rtt_ms is None else candidate.rtt_ms
        if is_new:
            self._event(f"reserved relay {relay_id[-8:]} at {', '.join(relay_addrs)}")
            self._node.addresses_changed()
        return reservation

    def _drop(self, relay_id: str, why: str, failed: bool = True) -> None:
        if self.reservations.pop(relay_id, None) is not None:
            self._event(f"{'lost' if failed else 'released'} relay {relay_id[-8:]}: {why}")
            candidate = self.candidates.get(relay_id)
            if candidate is not None and failed:
                candidate.failures += 1
                candidate.retry_at = time.monotonic() + backoff(candidate.failures)
            self._node.addresses_changed()

    # ------------------------------------------------------------- dialing

    async def dial(self, peer_id: str, addr: str) -> None:
        """Connect to ``peer_id`` through the relay named in ``addr``."""
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        pb = _pb()
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
            from libp2p.peer.id import ID

            # Not node.connect(): this runs inside the node's dial limiter
            # already, and taking a second slot could deadlock a full one.
            node.peers.add_addrs(relay_id, [f"{relay_addr}/p2p/{relay_id}"])
            await node._connect_any(ID.from_base58(relay_id), [multiaddr.Multiaddr(relay_addr)])
        stream = await compat.open_raw_stream(node.host, relay_id, HOP_PROTOCOL)
        try:
            from libp2p.peer.id import ID

            await _write(
                stream,
                pb.HopMessage(
                    type=pb.HopMessage.CONNECT,
                    peer=pb.PeerId(id=ID.from_base58(peer_id).to_bytes()),
                ),
            )
            answer = await _read(stream, pb.HopMessage)
            if answer.type != pb.HopMessage.STATUS or answer.status != StatusCode.OK:
                raise PeerUnreachable(
                    f"relay {relay_id[-8:]} could not connect us to {peer_id[-8:]}: "
                    f"{_status_name(answer.status)}"
                )
            await compat.upgrade_relayed_stream(node.host, stream, peer_id, relay_id, True)
        except BaseException:
            await _reset(stream)
            raise
        elapsed = (time.perf_counter() - start) * 1000
        self.connect_ms = [*self.connect_ms[-31:], elapsed]
        log.info(
            "connected to %s through relay %s in %.0f ms", peer_id[-8:], relay_id[-8:], elapsed
        )

    async def _handle_stop(self, stream: Any) -> None:
        """A relay brings us a connection: accept it (from relays we reserved with)."""
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        pb = _pb()
        relay_id = _peer_of(stream)
        try:
            message = await _read(stream, pb.StopMessage)
            if message.type != pb.StopMessage.CONNECT:
                await _write(
                    stream,
                    pb.StopMessage(
                        type=pb.StopMessage.STATUS, status=StatusCode.UNEXPECTED_MESSAGE
                    ),
                )
                await _reset(stream)
                return
            if relay_id not in self.reservations:
                await _write(
                    stream,
                    pb.StopMessage(type=pb.StopMessage.STATUS, status=StatusCode.PERMISSION_DENIED),
                )
                await _reset(stream)
                return
            source = ID(message.peer.id).to_base58()
            await _write(stream, pb.StopMessage(type=pb.StopMessage.STATUS, status=StatusCode.OK))
            conn = await compat.upgrade_relayed_stream(
                self._node.host, stream, source, relay_id, False
            )
        except Exception as exc:  # malformed, timed out, or the upgrade failed
            log.info("relayed connection via %s failed: %r", relay_id[-8:], exc)
            await _reset(stream)
            return
        log.info("accepted a connection from %s through relay %s", source[-8:], relay_id[-8:])
        # py-libp2p keeps a stream alive only while its handler runs.
        await conn.event_closed.wait()


def _decode_relay_addrs(raw: Iterable[bytes], relay_id: str) -> list[str]:
    import multiaddr

    out = []
    for item in list(raw)[:MAX_RELAY_ADDRS]:
        try:
            text = str(multiaddr.Multiaddr(item))
        except Exception:  # malformed bytes from the relay
            continue
        if "/p2p/" in text:
            text, _, pid = text.rpartition("/p2p/")
            if pid != relay_id:
                continue
        if tcp_addr(text) and text not in out:
            out.append(text)
    return out


def _substitute_unspecified(addr: str, remote: tuple[str, int] | None) -> str:
    parts = addr.split("/")
    if remote is not None and len(parts) >= 3 and parts[2] in ("0.0.0.0", "::"):
        parts[2] = remote[0]
    return "/".join(parts).rpartition("/p2p/")[0] if "/p2p/" in addr else "/".join(parts)
