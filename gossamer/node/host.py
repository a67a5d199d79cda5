"""The host adapter: everything gossamer does with py-libp2p's host, typed.

:class:`Host` owns the py-libp2p ``BasicHost`` (built with every workaround
of :mod:`gossamer.node._libp2p_compat` applied) and answers in gossamer's
terms: peer ids are base58 strings, addresses are text multiaddrs or
``multiaddr.Multiaddr``, connections are :class:`Connection`, streams are
:class:`Stream` (or, for the relay and DCUtR wire formats, raw py-libp2p
streams handed back unchanged).  Only this module and ``_libp2p_compat``
import ``libp2p`` (``tests/test_layers.py`` checks it); the node wires its
behaviours on top of a Host and never touches py-libp2p itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import _libp2p_compat as compat

if TYPE_CHECKING:
    import multiaddr

    from gossamer.node.config import NodeConfig
    from gossamer.node.identity import Identity

log = logging.getLogger(__name__)

WRITE_STALL_TIMEOUT_S = 30.0

RawStreamHandler = Callable[[Any], Awaitable[None]]


class Stream:
    """A libp2p stream with plain-Python failure modes.

    py-libp2p signals the end of a stream by raising ``StreamEOF`` from
    ``read`` (not by returning ``b""``) and a dead stream by several unrelated
    exception types (StreamReset, StreamClosed, StreamError, MuxedStream*, and
    bare IOException).  This adapter returns ``b""`` at EOF and raises
    ``ConnectionError`` for everything else, so the rest of gossamer handles
    one kind of failure.
    """

    __slots__ = ("_stream", "peer_id", "protocol")

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.peer_id: str = stream.muxed_conn.peer_id.to_base58()
        self.protocol: str = str(stream.get_protocol() or "")

    async def read(self, n: int | None = None) -> bytes:
        from libp2p.io.exceptions import IOException
        from libp2p.network.stream.exceptions import StreamEOF

        try:
            return await self._stream.read(n)
        except StreamEOF:
            return b""
        except (IOException, OSError, ValueError) as exc:
            raise ConnectionError(f"stream to {self.peer_id[-8:]} failed: {exc!r}") from None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; cancellation waits for the write to finish.

        Defect (not in the notes): cancelling a yamux write half-way leaves the
        muxer mid-frame and tears down the whole connection, every other
        stream on it included.  The write is therefore shielded, with its own
        stall deadline after which only this stream is reset.
        """
        from libp2p.io.exceptions import IOException

        payload = bytes(data) if not isinstance(data, bytes) else data
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WRITE_STALL_TIMEOUT_S
            try:
                await self._stream.write(payload)
            except (IOException, OSError, ValueError) as exc:
                raise ConnectionError(f"stream to {self.peer_id[-8:]} failed: {exc!r}") from None
        if scope.cancelled_caught:
            await self.reset()
            raise ConnectionError(
                f"stream to {self.peer_id[-8:]}: peer read nothing for {WRITE_STALL_TIMEOUT_S} s"
            )
        await trio.lowlevel.checkpoint_if_cancelled()

    async def close(self) -> None:
        """Close politely; a stream that is already gone is not an error."""
        try:
            await self._stream.close()
        except Exception as exc:  # py-libp2p raises many types on double close
            log.debug("closing stream to %s: %r", self.peer_id[-8:], exc)

    async def reset(self) -> None:
        try:
            await self._stream.reset()
        except Exception as exc:  # as above: reset of a dead stream raises
            log.debug("resetting stream to %s: %r", self.peer_id[-8:], exc)

    def remote_address(self) -> tuple[str, int] | None:
        try:
            return self._stream.get_remote_address()
        except Exception:  # some transports do not know it
            return None

    @property
    def relayed(self) -> bool:
        """Whether this stream rides a circuit-relay connection."""
        return raw_stream_kind(self._stream) == "relayed"


class Connection:
    """One open swarm connection to a peer (a handle: it holds no state of its own)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @property
    def peer_id(self) -> str:
        return self._conn.muxed_conn.peer_id.to_base58()

    @property
    def kind(self) -> str:
        """``"relayed"`` for a circuit-relay connection, else ``"direct"``.

        ``SwarmConn.get_transport_addresses()`` falls back to the *peerstore's*
        addresses when the connection's own are unknown (which may list relayed
        addresses for a direct connection), so only the connection type and the
        addresses recorded at upgrade time count.
        """
        from libp2p.connection_types import ConnectionType

        try:
            if self._conn.get_connection_type() == ConnectionType.RELAYED:
                return "relayed"
        except Exception:  # connection types without the method
            pass
        actual = getattr(self._conn, "_actual_transport_addresses", None) or []
        return "relayed" if any("/p2p-circuit" in str(a) for a in actual) else "direct"

    @property
    def initiated_by_us(self) -> bool:
        return bool(getattr(self._conn.muxed_conn, "is_initiator", False))

    @property
    def direction(self) -> str:
        """The swarm's own direction label, lower case (``"outbound"``, ``"inbound"``, ``""``)."""
        return str(getattr(self._conn, "direction", "")).rsplit(".", 1)[-1].lower()

    @property
    def remote(self) -> tuple[str, int] | None:
        """The (ip, port) at the other end of a direct connection; None if relayed/unknown."""
        if self.kind == "relayed":
            return None
        try:
            remote = self._conn.muxed_conn.get_remote_address()
        except Exception:  # muxers without the method
            return None
        return (str(remote[0]), int(remote[1])) if remote else None

    @property
    def transport_addr(self) -> str:
        """The first transport address the swarm knows for this connection, or ""."""
        try:
            addrs = self._conn.get_transport_addresses()
        except Exception:  # not every connection type knows its address
            return ""
        return str(addrs[0]) if addrs else ""

    @property
    def streams(self) -> int:
        return len(self._conn.get_streams())

    @property
    def local_port(self) -> int | None:
        """Our local TCP port of a direct connection (None if unknown)."""
        try:
            secured = self._conn.muxed_conn.secured_conn
            raw = getattr(secured, "conn", None) or getattr(secured, "raw_conn", None)
            stream = getattr(raw, "stream", None)
            sock = getattr(getattr(stream, "stream", None), "socket", None)
            return int(sock.getsockname()[1]) if sock is not None else None
        except Exception:  # any layer missing: not a plain TCP connection
            return None

    async def wait_closed(self) -> None:
        await self._conn.event_closed.wait()

    async def close(self) -> None:
        """Close; a connection that is already going away is not an error."""
        try:
            await self._conn.close()
        except Exception:  # py-libp2p close of a half-closed connection raises assorted errors
            log.debug("closing a connection to %s", self.peer_id[-8:], exc_info=True)


def raw_stream_kind(raw_stream: Any) -> str:
    """``"relayed"`` or ``"direct"``: the kind of connection a py-libp2p stream rides."""
    from libp2p.connection_types import ConnectionType

    try:
        kind = raw_stream.muxed_conn.get_connection_type()
    except Exception:  # not a muxed stream we know
        return "direct"
    return "relayed" if kind == ConnectionType.RELAYED else "direct"


def raw_stream_peer(raw_stream: Any) -> str:
    """The base58 peer id at the other end of a raw py-libp2p stream."""
    return raw_stream.muxed_conn.peer_id.to_base58()


class _Notifee:
    """Receives py-libp2p connection events and hands them on as :class:`Connection`."""

    def __init__(
        self, opened: Callable[[Connection], None], closed: Callable[[Connection], None]
    ) -> None:
        self._opened = opened
        self._closed = closed

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None

    async def connected(self, network: Any, conn: Any) -> None:
        self._opened(Connection(conn))

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._closed(Connection(conn))


def _remote_of(stream: Any) -> tuple[str, int] | None:
    try:
        remote = stream.get_remote_address()
    except Exception:  # a transport that does not know it
        return None
    return (str(remote[0]), int(remote[1])) if remote else None


def _peer(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)


class Host:
    """The py-libp2p host of one node, with every workaround applied."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        listen_addrs: Sequence[multiaddr.Multiaddr],
        addrs_filter: Callable[[list[str]], list[str]] | None = None,
        shape_socket: Callable[[trio.SocketStream], Any] | None = None,
    ) -> None:
        """``addrs_filter`` (text multiaddrs in, text multiaddrs out) decides what
        the host advertises (identify, :meth:`advertised_addrs`); a configured
        ``announce`` list wins.  ``shape_socket`` wraps every TCP socket of every
        connection, dialed, accepted or hole-punched (the node's link shaper)."""
        compat.route_libp2p_logging(
            logging.DEBUG if config.log_level == "debug" else logging.WARNING
        )
        self._listen = list(listen_addrs)
        self._host = compat.build_host(identity, config, self._listen, addrs_filter)
        self._shape_socket = shape_socket
        if shape_socket is not None:
            compat.shape_tcp_connections(self._host, shape_socket)
        self._handshaking: set[Any] = set()  # inbound (ip, port) whose handshake runs
        self._admission: tuple[Callable[[str | None], bool], Callable[[str | None], None]] = (
            lambda ip: True,
            lambda ip: None,
        )

    # ------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Listen on the configured addresses for the duration of the block."""
        async with self._host.run(self._listen):
            yield

    async def close(self) -> None:
        try:
            await self._host.close()
        except Exception:  # py-libp2p close of half-open connections raises assorted errors
            log.debug("error while closing the libp2p host", exc_info=True)

    def on_connections(
        self, opened: Callable[[Connection], None], closed: Callable[[Connection], None]
    ) -> None:
        """Call ``opened(conn)`` / ``closed(conn)`` for every connection (synchronously)."""

        def on_opened(conn: Connection) -> None:
            self._handshake_over(conn.remote)
            opened(conn)

        self._host.get_network().register_notifee(_Notifee(on_opened, closed))

    def admit_inbound(
        self, begin: Callable[[str | None], bool], end: Callable[[str | None], None]
    ) -> None:
        """Ask ``begin(ip)`` before the handshake of every inbound TCP connection (False:
        close it unanswered); ``end(ip)`` follows exactly once, when its handshake completes or
        it fails."""
        self._admission = (begin, end)
        compat.wrap_inbound_connections(self._host, self._inbound)

    async def _inbound(self, handle: Callable[[], Awaitable[None]], stream: Any) -> None:
        remote = _remote_of(stream)
        ip = remote[0] if remote else None
        begin, _ = self._admission
        if not begin(ip):
            with contextlib.suppress(Exception):  # the peer may be gone already
                await stream.close()
            return
        if self._shape_socket is not None:
            compat.wrap_raw_socket(stream, self._shape_socket)
        key = remote or ("", id(stream))
        self._handshaking.add(key)
        try:
            await handle()
        finally:
            self._handshake_over(key)

    def _handshake_over(self, key: Any) -> None:
        if key in self._handshaking:
            self._handshaking.discard(key)
            self._admission[1](key[0] or None)

    # ------------------------------------------------------------- addresses

    def listen_addrs(self) -> list[str]:
        """The transport addresses we listen on (ip may be 0.0.0.0)."""
        return [str(a) for a in self._host.get_transport_addrs()]

    def advertised_addrs(self) -> list[str]:
        """What identify advertises (the listen addresses through the node's filter)."""
        return [str(a) for a in self._host.get_addrs()]

    def tcp_listeners(self) -> list[tuple[str, int]]:
        """The (ip, port) of each TCP listener (ip may be 0.0.0.0)."""
        out = []
        for text in self.listen_addrs():
            parts = text.split("/")
            if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
                out.append((parts[2], int(parts[4])))
        return out

    async def push_identify(self) -> None:
        """Tell connected peers our protocols and addresses changed.

        Defect (not in the notes): py-libp2p pushes identify only when a listener
        is added; a stream handler registered later (the relay hop service once
        the node turns out to be public) or a newly confirmed address stays
        unknown to connected peers until they reconnect.
        """
        try:
            await self._host._push_identify_to_all_peers()
        except Exception:  # best effort: peers also learn it on their next identify
            log.debug("identify push failed", exc_info=True)

    # ----------------------------------------------------------- connections

    def connections(self, peer_id: str) -> list[Connection]:
        """The open swarm connections to ``peer_id``."""
        try:
            conns = self._host.get_network().get_connections(_peer(peer_id))
        except ValueError:  # not a peer id
            return []
        return [Connection(c) for c in conns if not c.is_closed]

    def is_connected(self, peer_id: str) -> bool:
        return bool(self.connections(peer_id))

    def connected_peers(self) -> list[str]:
        """Peers with an open connection (the swarm keeps a closed one listed for a moment)."""
        return [
            str(pid)
            for pid, conns in self._host.get_network().get_connections_map().items()
            if any(not c.is_closed for c in conns)
        ]

    def connection_count(self) -> int:
        return sum(len(c) for c in self._host.get_network().get_connections_map().values())

    def muxer_stats(self) -> dict[str, int]:
        """What the stream muxer holds across our connections (streams, unread bytes, events):
        per-connection state a peer's streams can grow, reported in ``node status``."""
        return compat.muxer_stats(self._host)

    async def dial(self, peer_id: str, addr: multiaddr.Multiaddr | None) -> None:
        """One dial of ``peer_id`` at ``addr`` (a transport address, no /p2p/).

        py-libp2p 0.8.1 dials only the first address per transport class that
        its peerstore holds for a peer, and keeps every address it ever saw: a
        peer that restarted on a new port would be dialed at its dead old port
        forever.  So each dial leaves exactly ``addr`` in the peerstore
        (``None``: dial with what the peerstore holds).
        """
        from libp2p.peer.peerinfo import PeerInfo

        target = _peer(peer_id)
        if addr is None:
            await self._host.connect(PeerInfo(target, []))
            return
        self._host.get_peerstore().clear_addrs(target)
        await self._host.connect(PeerInfo(target, [addr]))

    async def disconnect(self, peer_id: str) -> None:
        try:
            await self._host.disconnect(_peer(peer_id))
        except Exception:  # already gone
            log.debug("disconnect %s", peer_id[-8:], exc_info=True)

    def supports(self, peer_id: str, protocol: str) -> bool | None:
        """What identify told us about ``peer_id`` speaking ``protocol`` (None: unknown)."""
        try:
            protocols = self._host.get_peerstore().get_protocols(_peer(peer_id))
        except Exception:  # peer not in the peerstore yet
            return None
        if not protocols:
            return None
        return protocol in {str(p) for p in protocols}

    def peerstore_addrs(self, peer_id: str) -> list[str]:
        """The addresses py-libp2p's peerstore holds for ``peer_id`` (identify fills it)."""
        try:
            return [str(a) for a in self._host.get_peerstore().addrs(_peer(peer_id))]
        except Exception:  # PeerStoreError when the peer is unknown
            return []

    # --------------------------------------------------------------- streams

    def set_stream_handler(self, protocol: str, handler: RawStreamHandler) -> None:
        """Register ``handler(raw py-libp2p stream)`` for inbound ``protocol`` streams."""
        self._host.set_stream_handler(protocol, handler)

    def remove_stream_handler(self, protocol: str) -> None:
        self._host.remove_stream_handler(protocol)

    async def new_stream(self, peer_id: str, protocol: str) -> Any:
        """A raw py-libp2p stream to a connected ``peer_id`` speaking ``protocol``."""
        return await self._host.new_stream(_peer(peer_id), [protocol])

    # ------------------------------------------------------- NAT traversal

    async def prove_listener(self, ip: str, port: int, peer_id: str) -> None:
        """A *fresh* TCP connection to (ip, port) and a Noise handshake with ``peer_id``.

        Returns when the peer listening there proved it holds ``peer_id``'s key;
        raises otherwise.  The connection is never registered in the swarm and
        is closed at once.

        Defect 5 (notes): py-libp2p's AutoNAT v1 "dials back" over the existing
        connection and so rates every peer public.  This is the real dial-back.
        """
        swarm = self._host.get_network()
        maddr = compat.tcp_maddr(ip, port)
        transport = swarm.transport_manager.transport_for_dialing(maddr)
        if transport is None:
            raise ConnectionError(f"no transport dials {maddr}")
        raw = await transport.dial(maddr)
        try:
            secured = await swarm.upgrader.upgrade_security(raw, True, _peer(peer_id))
            try:
                await secured.close()
            except Exception:  # closing a session the peer already dropped
                log.debug("closing dial-back session", exc_info=True)
        finally:
            with contextlib.suppress(Exception):  # already closed by the session
                await raw.close()

    async def upgrade_relayed_stream(
        self, raw_stream: Any, peer_id: str, relay_id: str, initiator: bool
    ) -> Connection:
        """Turn a relay circuit (a stream to/through the relay) into a swarm connection.

        Noise and Yamux run end to end inside the circuit, so the relay sees
        only ciphertext.  The connection is tagged RELAYED with its circuit
        address (the generic upgrade cannot know either).
        """
        import multiaddr
        from libp2p.connection_types import ConnectionType
        from libp2p.network.connection.raw_connection import RawConnection

        circuit = multiaddr.Multiaddr(f"/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}")
        raw = RawConnection(
            stream=raw_stream,
            initiator=initiator,
            connection_type=ConnectionType.RELAYED,
            addresses=[circuit],
        )
        swarm = self._host.get_network()
        target = _peer(peer_id)
        if initiator:
            conn = await swarm.upgrade_outbound_raw_conn(raw, target)
        else:
            muxed = await swarm.upgrade_inbound_raw_conn(raw, circuit)
            if muxed.peer_id != target:
                await muxed.close()
                raise ConnectionError("relayed peer is not who the relay announced")
            conn = next(
                (c for c in swarm.get_connections(target) if c.muxed_conn is muxed),
                None,
            )
            if conn is None:
                raise ConnectionError("relayed connection was not registered")
        conn.set_transport_info([circuit], ConnectionType.RELAYED)
        return Connection(conn)

    async def upgrade_punched(
        self, stream: trio.SocketStream, peer_id: str, as_responder: bool
    ) -> Connection | None:
        """Run Noise + Yamux on a hole-punched TCP stream and register it in the swarm.

        ``as_responder``: take the security responder's role although we called
        connect() (TCP simultaneous open: both ends did; the DCUtR spec gives the
        initiator the responder's role).  Uses the swarm's own upgrade paths, as
        ``Swarm.dial_addr(_as_responder)`` does after its dial.
        """
        from libp2p.io.trio import TrioTCPStream
        from libp2p.network.connection.raw_connection import RawConnection

        swarm = self._host.get_network()
        target = _peer(peer_id)
        remote = stream.socket.getpeername()
        shaped = stream if self._shape_socket is None else self._shape_socket(stream)
        raw = RawConnection(TrioTCPStream(shaped), not as_responder)
        try:
            if not as_responder:
                return Connection(await swarm.upgrade_outbound_raw_conn(raw, target))
            muxed = await swarm.upgrade_inbound_raw_conn(
                raw, compat.tcp_maddr(remote[0], remote[1])
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await raw.close()
            raise
        if muxed.peer_id != target:
            await muxed.close()
            raise ConnectionError(f"hole punch reached {muxed.peer_id}, not {peer_id}")
        conn = next((c for c in swarm.get_connections(target) if c.muxed_conn is muxed), None)
        return None if conn is None else Connection(conn)

    def relay_reservations(self, limits: compat.RelayLimitsSpec) -> compat.RelayReservations:
        """py-libp2p's reservation bookkeeping for a relay we serve (see the class)."""
        return compat.RelayReservations(limits, self._host)

    async def run_stock_dcutr(self) -> None:
        """Serve py-libp2p's own DCUtR protocol until cancelled (only for
        ``gossamer bench nat --dcutr py-libp2p``, which compares it with ours)."""
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(DCUtRProtocol(self._host)):
            await trio.sleep_forever()


__all__ = ["Connection", "Host", "Stream", "raw_stream_kind", "raw_stream_peer"]
