"""The node: one libp2p host on trio, and the services composed on it.

``async with Node(config) as node:`` starts the host, the RPC server, the
tensor data plane and the connection manager in the node's own nursery and
stops all of them on exit.  Protocols register through :meth:`Node.register`
and :meth:`Node.set_stream_handler`; no service reaches into another.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import addresses
from gossamer.node.admission import Admission, AdmissionLimits, is_loopback
from gossamer.node.complaints import Complaints, Misbehaviour
from gossamer.node.config import NodeConfig
from gossamer.node.errors import GossamerError, PeerUnreachable
from gossamer.node.hooks import Services, T
from gossamer.node.host import Connection, Host, Stream
from gossamer.node.identity import Identity, load_or_create
from gossamer.node.peers import PeerTable
from gossamer.node.rpc import CallContext, RpcClient, RpcServer, Service, rpc
from gossamer.node.shaper import Shaper

if TYPE_CHECKING:
    import multiaddr

    from gossamer.node.dataplane.plane import DataPlane
    from gossamer.node.holepunch import HolePuncher
    from gossamer.node.reachability import Reachability
    from gossamer.node.relay import Relays
    from gossamer.node.upnp import PortMapper

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]


class NodeService(Service):
    """Built-in service every node answers: liveness and self-description."""

    name = "node"

    def __init__(self, node: Node) -> None:
        self._node = node

    @rpc
    async def ping(self, ctx: CallContext, nonce: int = 0) -> int:
        return nonce

    @rpc
    async def info(self, ctx: CallContext) -> dict[str, Any]:
        return {
            "peer_id": self._node.peer_id,
            "addrs": self._node.addrs(),
            "protocols": self._node.rpc_server.protocols,
            "agent": "gossamer/0.1.0",
        }


class Node:
    """A gossamer node: identity, libp2p host, RPC, data plane and peers."""

    def __init__(self, config: NodeConfig | None = None, identity: Identity | None = None) -> None:
        self.config = config or NodeConfig()
        self.identity = identity or load_or_create(self.config.data_dir)
        self.peer_id = self.identity.peer_id
        self.peers = PeerTable()
        self.rpc_server = RpcServer(self)
        self.rpc = RpcClient(self)
        self.host: Host | None = None
        self.started_at: float | None = None
        # the emulated access link every TCP connection of this node crosses (node/shaper.py)
        self.shaper = Shaper(self.config.shape)
        self._dial_limiter = trio.Semaphore(self.config.max_concurrent_dials)
        self._exit_stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._connection_events: dict[str, trio.Event] = {}
        self._dataplane: DataPlane | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        # callback(peer_id, connected) when a connection opens / the last one closes
        self._connection_listeners: list[Callable[[str, bool], None]] = []
        # callback() when our advertised addresses change (relay, UPnP, dial-back)
        self._addresses_listeners: list[Callable[[], None]] = []
        # where our addresses come from besides the listeners (see add_address_source)
        self._confirmed_sources: list[Callable[[], list[str]]] = []
        self._relayed_sources: list[Callable[[], list[str]]] = []
        # dial(peer_id, relayed multiaddr) for ``.../p2p-circuit/...`` addresses
        self._relayed_dialer: Callable[[str, str], Awaitable[None]] | None = None
        self._services = Services()
        # peer-provoked failures: one log line per peer per minute, with a count, and a score
        self.complaints = Complaints()
        self.misbehaviour = Misbehaviour(
            ban_score=self.config.misbehaviour_ban_score,
            ban_seconds=self.config.misbehaviour_ban_seconds,
        )
        config = self.config
        self.admission = Admission(
            AdmissionLimits(
                handshakes_per_ip=config.admission_handshakes_per_ip,
                handshakes_per_subnet=config.admission_handshakes_per_subnet,
                handshakes_total=config.admission_handshakes_total,
                connections_per_ip=config.admission_connections_per_ip,
                max_connections=config.max_connections,
                evict_idle_after=config.admission_evict_idle_after,
                full_ip_handshake_every=config.admission_full_ip_handshake_every,
                exempt_loopback=config.admission_exempt_loopback,
            )
        )
        # peers whose connections admission never closes to make room (see add_protected_peers)
        self._protected_sources: list[Callable[[], Iterable[str]]] = []
        # name -> handler(params) for the daemon's local control API; layers
        # above the node (dht, crdt, training) add their own methods here.
        self.control_methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        # NAT traversal (reachability.py, relay.py, holepunch.py, upnp.py), set on start
        self.reachability: Reachability | None = None
        self.relays: Relays | None = None
        self.holepunch: HolePuncher | None = None
        self.upnp: PortMapper | None = None
        self._register_builtin_control()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Node:
        listen = [addresses.parse_multiaddr(a, what="listen address") for a in self.config.listen]
        shape = self.shaper.wrap if self.shaper.active else None
        host = self.host = Host(self.identity, self.config, listen, self._advertised_addrs, shape)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self.shaper.start(self._nursery)
            if self.shaper.active:
                log.info("link shaped: %s", self.shaper.shape.describe())
            await stack.enter_async_context(host.run())
            if not host.listen_addrs():
                # py-libp2p logs a failed bind and carries on listening on nothing.
                raise GossamerError(
                    f"could not listen on {', '.join(self.config.listen)} "
                    "(address in use or not local)"
                )
            host.on_connections(self._on_connected, self._on_disconnected)
            host.admit_inbound(self._begin_handshake, self.admission.end_handshake)
            self.register(NodeService(self))
            from gossamer.node.dataplane.plane import DataPlane

            self._dataplane = DataPlane(self)
            await self._dataplane.start(self._nursery)
            self._start_nat_traversal()
            self._nursery.start_soon(self._ping_loop)
            for addr in self.config.bootstrap:
                self._nursery.start_soon(self._keep_bootstrap_connected, addr)
        except BaseException:
            self._nursery.cancel_scope.cancel() if self._nursery else None
            await stack.__aexit__(None, None, None)
            raise
        self._exit_stack = stack
        self.started_at = time.time()
        log.info("node %s listening on %s", self.peer_id, ", ".join(self.addrs()))
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._exit_stack is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()
        stack, self._exit_stack = self._exit_stack, None
        try:
            with trio.CancelScope(shield=True):
                for closer in reversed(self._closers):
                    try:
                        await closer()
                    except Exception:
                        log.warning("error while stopping a service", exc_info=True)
                if self._dataplane is not None:
                    try:
                        await self._dataplane.aclose()
                    except Exception:
                        log.warning("error while stopping the data plane", exc_info=True)
                assert self.host is not None
                await self.host.close()
        finally:
            # Whatever happened above, the nursery and host.run() must be exited
            # here, in this task, or trio's nursery stack is corrupted.
            suppressed = await stack.__aexit__(*exc_info)
        # The host's cleanup checkpoints inside the (cancelled) node nursery, so
        # an error raised in the ``async with`` body would come back replaced by
        # a Cancelled that the nursery then absorbs: never swallow the body's error.
        if exc_info[1] is not None and not isinstance(exc_info[1], trio.Cancelled):
            return False
        return suppressed

    @property
    def nursery(self) -> trio.Nursery:
        """The node's nursery, for services that run background tasks."""
        if self._nursery is None:
            raise GossamerError("the node is not running")
        return self._nursery

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(peer_id, True)`` when a connection to a peer opens and
        ``(peer_id, False)`` when its last one closes (synchronously: start tasks for I/O)."""
        self._connection_listeners.append(listener)

    def attach(self, service: object) -> None:
        """Attach a service of a layer above (the DHT, the run documents, …) so
        that others find it with :meth:`service`; one per type."""
        self._services.attach(service)

    def detach(self, service: object) -> None:
        self._services.detach(service)

    def service(self, kind: type[T]) -> T | None:
        """The attached service that is a ``kind`` (a class, or a protocol such as
        :class:`gossamer.node.hooks.ContentRouting`), or None."""
        return self._services.get(kind)

    def add_addresses_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (synchronously: start tasks for I/O) whenever our
        advertised addresses change, after identify has been pushed."""
        self._addresses_listeners.append(listener)

    def _notify_connection(self, peer_id: str, connected: bool) -> None:
        for listener in self._connection_listeners:
            try:
                listener(peer_id, connected)
            except Exception:
                log.warning("connection listener failed", exc_info=True)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` when the node stops (services flush state here)."""
        self._closers.append(closer)

    @property
    def dataplane(self) -> DataPlane:
        """The tensor data plane (:class:`gossamer.node.dataplane.DataPlane`)."""
        if self._dataplane is None:
            raise GossamerError("the node is not running")
        return self._dataplane

    def add_address_source(self, source: Callable[[], list[str]], *, relayed: bool = False) -> None:
        """Add ``source()``'s multiaddrs to ours: confirmed direct addresses (a dial-back,
        a port mapping) go through the host's advertised set; ``relayed`` ones (circuit
        addresses) are appended after it (the host mangles them: ``relay_addrs.circuit_addr``)."""
        (self._relayed_sources if relayed else self._confirmed_sources).append(source)

    def set_relayed_dialer(self, dial: Callable[[str, str], Awaitable[None]]) -> None:
        """``dial(peer_id, addr)`` connects through the relay a ``/p2p-circuit`` address names."""
        self._relayed_dialer = dial

    def _start_nat_traversal(self) -> None:
        """The composition root of NAT traversal: each behaviour gets what it needs."""
        from gossamer.node.holepunch import HolePuncher
        from gossamer.node.reachability import Reachability
        from gossamer.node.relay import Relays
        from gossamer.node.upnp import PortMapper

        reachability = self.reachability = Reachability(self)
        relays = self.relays = Relays(self, reachability)
        self.holepunch = HolePuncher(self, reachability)
        self.upnp = PortMapper(self, reachability)
        self.add_address_source(lambda: list(reachability.verdict.confirmed_addrs))
        self.add_address_source(relays.circuit_addrs, relayed=True)
        self.set_relayed_dialer(relays.dial)
        self.add_protected_peers(lambda: list(relays.client.reservations))
        reachability.start()
        relays.start()
        self.holepunch.start()
        self.upnp.start()

    # ----------------------------------------------------------------- addresses

    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>.

        Listen addresses, addresses a dial-back confirmed, and one relayed
        address per relay reservation (``.../p2p-circuit/p2p/<us>``).
        """
        if self.host is None:
            return []
        out = []
        for text in self.host.advertised_addrs():
            if "/p2p/" not in text:
                text += f"/p2p/{self.peer_id}"
            out.append(text)
        for source in self._relayed_sources:
            out.extend(a for a in source() if a not in out)
        return out

    def _advertised_addrs(self, candidates: list[str]) -> list[str]:
        """What the libp2p host advertises: listen addrs + dial-back-confirmed ones."""
        listening = set(self.host.listen_addrs()) if self.host else set()
        out = [c for c in candidates if c in listening]
        for source in self._confirmed_sources:
            out.extend(a for a in source() if a not in out)
        return out

    def addresses_changed(self) -> None:
        """Our advertised addresses changed (relay reservation, UPnP, dial-back):
        push identify to connected peers and tell the addresses listeners."""
        if self._nursery is None:
            return
        assert self.host is not None
        self._nursery.start_soon(self.host.push_identify)
        for listener in self._addresses_listeners:
            try:
                listener()
            except Exception:
                log.warning("addresses listener failed", exc_info=True)

    # ------------------------------------------------------- connection kinds

    def connection_kinds(self, peer_id: str) -> list[str]:
        """``"direct"`` / ``"relayed"`` for each open connection to ``peer_id``."""
        if self.host is None:
            return []
        return [c.kind for c in self.host.connections(peer_id)]

    def connection_paths(self) -> dict[str, list[dict[str, Any]]]:
        """Every open connection per peer: kind, direction and remote address."""
        out: dict[str, list[dict[str, Any]]] = {}
        assert self.host is not None
        for peer_id in self.connected_peers():
            for conn in self.host.connections(peer_id):
                remote = conn.remote
                out.setdefault(peer_id, []).append(
                    {
                        "kind": conn.kind,
                        "direction": conn.direction,
                        "remote": f"{remote[0]}:{remote[1]}" if remote else "",
                        "streams": conn.streams,
                    }
                )
        return out

    def peer_remote(self, peer_id: str) -> tuple[str, int] | None:
        """(ip, port) we see ``peer_id`` at on a direct connection; None if relayed only."""
        assert self.host is not None
        for conn in self.host.connections(peer_id):
            remote = conn.remote
            if remote is not None:
                return remote
        return None

    def relayed_direction(self, peer_id: str) -> str:
        """``"inbound"`` if a relay brought ``peer_id`` to us, ``"outbound"`` if we dialed."""
        assert self.host is not None
        for conn in self.host.connections(peer_id):
            if conn.kind == "relayed":
                return "outbound" if conn.initiated_by_us else "inbound"
        return ""

    def connection_upgraded(self, peer_id: str) -> None:
        """A hole punch made the connection to ``peer_id`` direct: move traffic off the relay."""
        self.rpc.forget_peer(peer_id)  # idle RPC streams ride the relayed connection
        if self._nursery is not None:
            self._nursery.start_soon(self._close_relayed_later, peer_id)

    async def _close_relayed_later(self, peer_id: str) -> None:
        await trio.sleep(self.config.holepunch_relay_grace)
        if "direct" not in self.connection_kinds(peer_id):
            return  # never strand the peer
        assert self.host is not None
        for conn in self.host.connections(peer_id):
            if conn.kind == "relayed":
                await conn.close()

    # --------------------------------------------------------------- connections

    async def connect(self, addr: str) -> str:
        """Connect to the peer at multiaddr ``addr`` (ending in /p2p/<id>); return its id.

        A relayed address (``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<id>``)
        connects through that relay.
        """
        from gossamer.node.relay_addrs import target_peer

        maddr = addresses.parse_multiaddr(addr, what="peer address", need_peer_id=True)
        # the *last* /p2p/ names the peer (a relayed address names its relay first)
        peer_id = target_peer(addr) if addresses.is_relayed(maddr) else addresses.peer_id_of(maddr)
        assert peer_id is not None
        if peer_id == self.peer_id:
            raise GossamerError("refusing to connect to ourselves")
        self.peers.add_addrs(peer_id, [addr])
        await self._dial(peer_id, [maddr])
        return peer_id

    async def ensure_connected(self, peer_id: str) -> None:
        """Connect to ``peer_id`` using the addresses we know, unless already connected."""
        if self.is_connected(peer_id):
            return
        info = self.peers.get(peer_id)
        known = [addresses.parse_multiaddr(a) for a in info.addrs] if info else []
        await self._dial(peer_id, known)

    def is_connected(self, peer_id: str) -> bool:
        return self.host is not None and self.host.is_connected(peer_id)

    def connected_peers(self) -> list[str]:
        return self.host.connected_peers() if self.host is not None else []

    async def _dial(self, peer_id: str, maddrs: list[multiaddr.Multiaddr]) -> None:
        if self.is_connected(peer_id):
            return
        bare = [_strip_p2p(a) for a in maddrs]
        try:
            async with self._dial_limiter:
                with trio.fail_after(self.config.dial_timeout):
                    await self.dial_addresses(peer_id, bare)
        except trio.TooSlowError:
            self.peers.on_dial_failed(peer_id)
            raise PeerUnreachable(
                f"dial to {peer_id[-8:]} timed out after {self.config.dial_timeout} s"
            ) from None
        except Exception as exc:  # py-libp2p raises SwarmException and friends, deeply nested
            self.peers.on_dial_failed(peer_id)
            raise PeerUnreachable(f"cannot connect to {peer_id[-8:]}: {_root_cause(exc)}") from None

    async def dial_addresses(self, peer_id: str, bare: list[multiaddr.Multiaddr]) -> None:
        """Dial ``peer_id`` at ``bare`` addresses (no /p2p/ suffix) one at a time,
        newest (last) first, each with its own fresh peerstore entry (see
        :meth:`Host.dial`).

        Takes no dial-limiter slot and sets no overall deadline: it is the step
        inside a dial (``connect``/``ensure_connected``) that a relay dial also
        uses to reach its relay, which already holds a slot.
        """
        assert self.host is not None
        if not bare:
            await self.host.dial(peer_id, None)
            return
        failure: Exception | None = None
        # Direct addresses first; relayed ones (through a relay) only if no
        # direct one answers.  With a relayed fallback, a direct attempt gets
        # a third of the dial budget (a NAT that drops SYNs never refuses).
        relayed = [a for a in bare if addresses.is_relayed(a)]
        direct = [a for a in bare if not addresses.is_relayed(a)]
        per_direct = self.config.dial_timeout / 3 if relayed else float("inf")
        for addr in reversed(direct):
            try:
                with trio.fail_after(per_direct):
                    await self.host.dial(peer_id, addr)
                return
            except Exception as exc:  # try the next address
                failure = exc
        for addr in reversed(relayed):
            if self._relayed_dialer is None:
                break
            try:
                await self._relayed_dialer(peer_id, str(addr))
                return
            except Exception as exc:  # try the next relay
                failure = exc
        assert failure is not None
        raise failure

    async def disconnect(self, peer_id: str) -> None:
        if self.host is not None:
            await self.host.disconnect(peer_id)

    async def wait_connected(self, peer_id: str) -> None:
        """Wait until some connection to ``peer_id`` exists (inbound or outbound)."""
        while not self.is_connected(peer_id):
            event = self._connection_events.setdefault(peer_id, trio.Event())
            await event.wait()

    def add_protected_peers(self, source: Callable[[], Iterable[str]]) -> None:
        """Peers ``source()`` names are never evicted to make room (relays we hold
        reservations with, members of our runs); bootstrap peers always are protected."""
        self._protected_sources.append(source)

    def protected_peers(self) -> set[str]:
        out = {p.peer_id for p in self.peers.all() if p.bootstrap}
        for source in self._protected_sources:
            try:
                out.update(source())
            except Exception:
                log.warning("a protected-peers source failed", exc_info=True)
        return out

    def misbehaved(
        self, logger: logging.Logger, peer_id: str, points: float, message: str, *args: object
    ) -> None:
        """``peer_id``'s bytes broke a rule: log it (once per peer per minute) and score it;
        a peer that keeps at it is disconnected and refused for a while (``misbehaviour_*``)."""
        self.complaints.log(logger, peer_id, message, *args)
        remote = self.peer_remote(peer_id) if self.host is not None else None
        if self.config.misbehaviour_exempt_loopback and remote and is_loopback(remote[0]):
            return
        seconds = self.misbehaviour.record(peer_id, points)
        if seconds is not None:
            log.warning("banning %s for %.0f s: it kept misbehaving", peer_id[-8:], seconds)
            if self._nursery is not None:
                self._nursery.start_soon(self.disconnect, peer_id)

    def _connections_from(self, ip: str | None, peers: Iterable[str]) -> int:
        """The connections of ``peers`` whose remote end is ``ip``."""
        assert self.host is not None
        return sum(
            1
            for peer in peers
            for c in self.host.connections(peer)
            if c.remote is not None and c.remote[0] == ip
        )

    def _begin_handshake(self, ip: str | None) -> bool:
        assert self.host is not None
        from_ip = 0 if ip is None else self._connections_from(ip, self.host.connected_peers())
        refusal = self.admission.begin_handshake(
            ip, connections_from_ip=from_ip, now=time.monotonic()
        )
        if refusal is not None:
            self.complaints.log(log, f"ip:{ip}", "refused an inbound connection: %s", refusal)
        return refusal is None

    def _on_connected(self, conn: Connection) -> None:
        peer_id = conn.peer_id
        direction = "outbound" if conn.initiated_by_us else "inbound"
        remote = conn.transport_addr
        assert self.host is not None
        if self.misbehaviour.banned(peer_id):
            self.complaints.log(log, peer_id, "refusing banned %s", peer_id[-8:])
            self.nursery.start_soon(conn.close)
            return
        ip = conn.remote[0] if conn.remote else None
        others = [p for p in self.host.connected_peers() if p != peer_id]
        now = time.time()
        idle_since = {}
        for other in others:
            seen = self.peers.get(other)
            idle_since[other] = (seen.last_seen or seen.first_seen) if seen else now
        decision = self.admission.on_connected(
            ip,
            connections_from_ip=self._connections_from(ip, [peer_id, *others]),
            total=self.host.connection_count(),
            peer_id=peer_id,
            idle_since=idle_since,
            protected_peers=self.protected_peers,
            now=now,
        )
        if not decision.admit:
            self.complaints.log(
                log, peer_id, "closing the connection of %s: %s", peer_id[-8:], decision.reason
            )
            self.nursery.start_soon(conn.close)
            return
        if decision.evict is not None:
            log.info("full: closing idle %s for %s", decision.evict[-8:], peer_id[-8:])
            self.nursery.start_soon(self.disconnect, decision.evict)
        self.peers.on_connected(peer_id, direction, remote)
        event = self._connection_events.pop(peer_id, None)
        if event is not None:
            event.set()
        self._notify_connection(peer_id, True)

    def _on_disconnected(self, conn: Connection) -> None:
        peer_id = conn.peer_id
        self.peers.on_disconnected(peer_id)
        if not self.is_connected(peer_id):
            self.rpc.forget_peer(peer_id)
            if self._dataplane is not None:
                self._dataplane.forget_peer(peer_id)
            self._notify_connection(peer_id, False)

    async def _keep_bootstrap_connected(self, addr: str) -> None:
        """Stay connected to a bootstrap peer: reconnect with capped, jittered backoff."""
        maddr = addresses.parse_multiaddr(addr, what="bootstrap address", need_peer_id=True)
        peer_id = addresses.peer_id_of(maddr)
        assert peer_id is not None
        if peer_id == self.peer_id:
            return
        self.peers.add_addrs(peer_id, [addr])
        self.peers.entry(peer_id).bootstrap = True
        delay = self.config.bootstrap_backoff_min
        while True:
            if not self.is_connected(peer_id):
                try:
                    await self._dial(peer_id, [maddr])
                    log.info("connected to bootstrap peer %s", peer_id[-8:])
                    delay = self.config.bootstrap_backoff_min
                except PeerUnreachable as exc:
                    log.info("bootstrap %s unreachable (%s); retry in %.1f s", addr, exc, delay)
                    await trio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, self.config.bootstrap_backoff_max)
                    continue
            await self._wait_disconnected(peer_id)

    async def _wait_disconnected(self, peer_id: str) -> None:
        # The notifee has no "last connection closed" event for a given peer;
        # poll cheaply (a dict lookup) at a pace well under any reconnect delay.
        while self.is_connected(peer_id):
            await trio.sleep(0.25)

    async def _ping_loop(self) -> None:
        """Measure round trips to connected peers for the peer table."""
        while True:
            await trio.sleep(self.config.ping_interval)
            for peer_id in self.connected_peers():
                self.nursery.start_soon(self._ping_quietly, peer_id)

    async def _ping_quietly(self, peer_id: str) -> None:
        try:
            await self.ping(peer_id)
        except GossamerError as exc:
            log.debug("ping %s failed: %s", peer_id[-8:], exc)

    async def ping(self, peer_id: str, timeout: float = 5.0) -> float:
        """Round trip time to ``peer_id`` in milliseconds (also recorded in the peer table)."""
        start = time.perf_counter()
        await self.rpc.call(peer_id, NodeService, "ping", {"nonce": 1}, timeout=timeout)
        rtt = (time.perf_counter() - start) * 1000
        self.peers.record_latency(peer_id, rtt)
        return rtt

    # ------------------------------------------------------------------ protocols

    def register(self, service: Service) -> None:
        """Serve an RPC service on ``/gossamer/<name>/<version>``."""
        self.rpc_server.register(service)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Run ``handler(stream)`` for each inbound stream of ``protocol``.

        The handler runs guarded: an exception is logged and the stream reset;
        it never reaches py-libp2p (whose task group would tear the
        connection down with it).
        """

        async def guarded(raw_stream: Any) -> None:
            try:
                stream = Stream(raw_stream)
            except Exception:  # a stream without a peer id: nothing to serve
                log.debug("inbound stream without a usable peer", exc_info=True)
                return
            try:
                await handler(stream)
            except BaseException as exc:
                # Cancelled (and KeyboardInterrupt) go on; anything else a peer's bytes
                # provoked stays here, even when it comes grouped with a Cancelled.
                failed, rest = _split_failures(exc)
                if failed is not None:
                    self.misbehaved(
                        log,
                        stream.peer_id,
                        20,
                        "handler for %s from %s failed: %s",
                        protocol,
                        stream.peer_id[-8:],
                        _root_cause(failed)[:200],
                    )
                    log.debug("the handler's failure", exc_info=failed)
                    with trio.CancelScope(shield=True):
                        await stream.reset()
                if rest is not None:
                    raise rest from None

        assert self.host is not None
        self.host.set_stream_handler(protocol, guarded)

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open a stream to ``peer_id`` speaking ``protocol`` (connecting first if needed)."""
        await self.ensure_connected(peer_id)
        assert self.host is not None
        try:
            raw = await self.host.new_stream(peer_id, protocol)
        except Exception as exc:  # multiselect and swarm failures come in many types
            raise PeerUnreachable(
                f"cannot open {protocol} to {peer_id[-8:]}: {_root_cause(exc)}"
            ) from None
        return Stream(raw)

    async def call(
        self,
        peer_id: str,
        service: str | type[Service],
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Shorthand for ``node.rpc.call(...)``."""
        return await self.rpc.call(peer_id, service, method, params, timeout=timeout)

    # ------------------------------------------------------------ control API

    def register_control(
        self, name: str, handler: Callable[[dict[str, Any]], Awaitable[Any]]
    ) -> None:
        """Expose ``handler(params) -> JSON-able result`` on the local control API."""
        if name in self.control_methods:
            raise ValueError(f"control method {name!r} is already registered")
        self.control_methods[name] = handler

    def _register_builtin_control(self) -> None:
        async def status(params: dict[str, Any]) -> Any:
            return self.status()

        async def peers(params: dict[str, Any]) -> Any:
            return [p.to_dict() for p in self.peers.all()]

        async def connect(params: dict[str, Any]) -> Any:
            addr = params.get("addr")
            if not isinstance(addr, str):
                raise GossamerError("connect needs 'addr', a multiaddr ending in /p2p/<id>")
            return {"peer_id": await self.connect(addr)}

        async def ping(params: dict[str, Any]) -> Any:
            peer_id = params.get("peer_id")
            if not isinstance(peer_id, str):
                raise GossamerError("ping needs 'peer_id'")
            return {"rtt_ms": await self.ping(peer_id)}

        for name, handler in (
            ("node.status", status),
            ("node.peers", peers),
            ("node.connect", connect),
            ("node.ping", ping),
        ):
            self.register_control(name, handler)

    # ------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        connected = self.peers.connected()
        return {
            "peer_id": self.peer_id,
            "addrs": self.addrs(),
            "uptime_s": round(time.time() - self.started_at, 1) if self.started_at else 0.0,
            "peers_connected": len(connected),
            "peers_known": len(self.peers),
            "protocols": self.rpc_server.protocols,
            "dataplane": self._dataplane.status() if self._dataplane else {},
            "muxer": self.host.muxer_stats() if self.host else {},
            "refused": {
                "connections": dict(self.admission.refused),
                "evicted_idle": self.admission.evicted,
                "banned_peers": self.misbehaviour.banned_count(),
                "complaints": self.complaints.total,
            },
            "reachability": self.reachability.to_dict() if self.reachability else "unknown",
            "nat": {
                "relay": self.relays.status() if self.relays else {},
                "holepunch": self.holepunch.status() if self.holepunch else {},
                "holepunch_refused": dict(self.holepunch.refused) if self.holepunch else {},
                "upnp": self.upnp.status() if self.upnp else {},
            },
        }


def _split_failures(
    exc: BaseException,
) -> tuple[BaseException | None, BaseException | None]:
    """(the Exceptions in ``exc``, the rest: Cancelled, KeyboardInterrupt, …)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)
    return (exc, None) if isinstance(exc, Exception) else (None, exc)


def _strip_p2p(maddr: Any) -> Any:
    """The transport part of a multiaddr (py-libp2p's peerstore wants it bare)."""
    import multiaddr

    text = str(maddr)
    if "/p2p-circuit" in text:
        return maddr
    idx = text.rfind("/p2p/")
    return multiaddr.Multiaddr(text[:idx]) if idx > 0 else maddr


def _root_cause(exc: BaseException) -> str:
    """The innermost message of py-libp2p's nested exception groups and chains."""
    seen = 0
    while seen < 20:
        seen += 1
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
