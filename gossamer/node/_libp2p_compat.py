"""Every workaround for py-libp2p 0.8.1, in one place.

gossamer pins ``libp2p==0.8.1``.  Each function below names the defect it
works around (numbers refer to ../shared/LIBP2P-NOTES.md, "Pitfalls found").
When the pin moves, re-check each one against the new release and delete what
the release fixed.  Nothing outside this module reaches into libp2p internals.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from gossamer.node.config import NodeConfig
    from gossamer.node.identity import Identity

log = logging.getLogger("gossamer.node.libp2p")

# Defect 1 (dial delay): Swarm.dial_peer starts one dial per address and then
# waits _HAPPY_EYEBALLS_DELAY (250 ms) for it to *fail* before it looks at the
# result, so every successful connect costs at least 250 ms.  Two fixes:
#  * with max_connections_per_peer == 1 (our default) the first successful dial
#    cancels that wait at once (the swarm's per-peer cap path);
#  * for larger caps the head start is cut to 20 ms.  0 is not safe: the notes
#    record a broken handshake with 0, because the fallback dial then races the
#    primary one on the same peer.
_DIAL_HEAD_START_S = 0.02


def _patch_dial_delay() -> None:
    import libp2p.network.swarm as swarm_module

    swarm_module._HAPPY_EYEBALLS_DELAY = _DIAL_HEAD_START_S


def _no_window_update_per_read() -> bool:
    return False


def _patch_yamux_window_updates() -> None:
    """Send yamux WINDOW_UPDATEs at half a window, as go-yamux does, not after every read.

    Defect (not in the notes): py-libp2p's yamux defaults PY_YAMUX_RELEASE_ON_READ
    to on, which answers every read with a WINDOW_UPDATE frame — one extra
    frame and socket send per RPC message in each direction.  Measured with
    ``gossamer bench rpc``: p50 0.97 → 0.77 ms, p99 3.3 → 1.3 ms.  An explicit
    PY_YAMUX_RELEASE_ON_READ in the environment still wins.
    """
    import os

    import libp2p.stream_muxer.yamux.yamux as yamux_module

    if "PY_YAMUX_RELEASE_ON_READ" not in os.environ:
        yamux_module._yamux_release_on_read = _no_window_update_per_read


class _IntoGossamerLogging(logging.Handler):
    """Re-emit a ``libp2p.*`` record as ``gossamer.libp2p.*``."""

    # Defect 10: normal closes are logged at ERROR/WARNING by several modules
    # (yamux, swarm, multiselect) although nothing went wrong.  They are
    # demoted to DEBUG so that an operator's ERROR lines mean something.
    _BENIGN_FRAGMENTS = (
        "stream reset",
        "connection closed",
        "closed stream",
        "stream closed",
        "eof",
        "cancelled",
        "broken pipe",
        "connection reset",
        "failed to upgrade",
        "muxed connection",
        # a dial-back (reachability.py) closes right after the security
        # handshake, so the muxer negotiation that follows always fails
        "fail to upgrade mux",
        # every failed dial is logged at ERROR by the TCP transport although
        # the caller handles it (hole punching expects refused dials)
        "open tcp stream",
        "opening tcp stream",
    )

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        suffix = name[len("libp2p") :] if name.startswith("libp2p") else "." + name
        if record.levelno >= logging.WARNING:
            message = record.getMessage().lower()
            if any(fragment in message for fragment in self._BENIGN_FRAGMENTS):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        target = logging.getLogger("gossamer.libp2p" + suffix)
        if target.isEnabledFor(record.levelno):
            record.name = target.name
            target.handle(record)


_routed = False


def route_libp2p_logging(level: int = logging.WARNING) -> None:
    """Send py-libp2p's log records into the ``gossamer.libp2p`` logger tree.

    Defect 10: ``import libp2p`` runs ``setup_logging()``, which sets the
    ``libp2p`` logger to ``propagate = False`` with no handler (records reach
    Python's last-resort stderr printer or vanish), and installs a queue
    listener when LIBP2P_DEBUG is set.  We replace its handlers with one that
    forwards into our tree so our handlers, levels and formats apply.
    """
    global _routed
    import libp2p  # noqa: F401  -- its import is what installs the bad setup

    root = logging.getLogger("libp2p")
    root.handlers.clear()
    root.addHandler(_IntoGossamerLogging())
    root.propagate = False
    root.setLevel(level)
    _routed = True


def noise_only_security(identity: Identity) -> dict[str, Any]:
    """Security options offering Noise and nothing else.

    Defect 4: ``new_host()`` without ``sec_opt`` offers ``/plaintext/2.0.0``,
    secio and TLS besides Noise; a peer could negotiate an unencrypted,
    unauthenticated connection.  We pass Noise explicitly and alone.
    """
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID, Transport

    return {
        PROTOCOL_ID: Transport(identity.libp2p_keypair(), noise_privkey=new_x25519().private_key)
    }


def build_host(
    identity: Identity,
    config: NodeConfig,
    listen_addrs: Sequence[Any],
    addrs_filter: Callable[[list[str]], list[str]] | None = None,
) -> Any:
    """Create the libp2p host (BasicHost) with every workaround applied.

    ``addrs_filter`` (text multiaddrs in, text multiaddrs out) decides what the
    host advertises (identify, ``host.get_addrs()``); see
    :func:`_advertised_addrs_factory`.  A configured ``announce`` list wins.
    """
    from libp2p import new_host
    from libp2p.network.config import ConnectionConfig
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    _patch_dial_delay()
    _patch_yamux_window_updates()
    connection_config = ConnectionConfig(
        max_connections=config.max_connections,
        max_connections_per_peer=config.max_connections_per_peer,
        dial_timeout=config.dial_timeout,
        # The pruner trims from high_watermark down to low_watermark.
        min_connections=0,
        low_watermark=max(1, config.max_connections * 9 // 10),
        high_watermark=config.max_connections,
    )
    announce = None
    factory = None
    if config.announce:
        import multiaddr

        announce = [multiaddr.Multiaddr(a) for a in config.announce]
    elif addrs_filter is not None:
        factory = _advertised_addrs_factory(addrs_filter)
    host = new_host(
        key_pair=identity.libp2p_keypair(),
        sec_opt=noise_only_security(identity),
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=list(listen_addrs),
        connection_config=connection_config,
        announce_addrs=announce,
        addrs_factory=factory,
        # Defect 7-adjacent: mDNS multicasts on the LAN; tests must not.
        enable_mDNS=config.mdns,
        enable_upnp=False,
    )
    _disable_auto_connector(host)
    _leave_dial_retries_to_us(host)
    return host


def _leave_dial_retries_to_us(host: Any) -> None:
    """One dial attempt per call; the node's connection manager owns retries.

    Defect (not in the notes): after every address of a peer fails once, the
    swarm refuses to dial that peer again for 60 s ("negative cache"), and each
    dial is itself retried 3 times with backoff inside the swarm.  A bootstrap
    peer that restarts would stay unreachable for a minute, and a dead one
    costs 0.7 s per attempt.  We disable both; reconnect backoff lives in
    Node._keep_bootstrap_connected.
    """
    from libp2p.network.config import RetryConfig

    swarm = host.get_network()
    swarm.retry_config = RetryConfig(max_retries=0)
    swarm._negative_peer_cache._ttl = 0.0


async def _no_auto_connect() -> None:
    return None


def _disable_auto_connector(host: Any) -> None:
    """Stop the swarm from dialing every peer it has heard of.

    Defect (not in the notes): Swarm's AutoConnector dials peers from the
    peerstore until the connection count reaches the midpoint of the low and
    high watermarks (128 of 256 by default), every 30 s.  In a DHT the
    peerstore fills with everyone we heard of, so a node would dial the whole
    swarm.  Our connection manager decides whom to stay connected to.
    """
    host.get_network().auto_connector.maybe_connect = _no_auto_connect


WRITE_STALL_TIMEOUT_S = 30.0


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


# ============================================================== NAT traversal
# What reachability.py, relay.py and holepunch.py need from py-libp2p, and the
# defects found on the way (each reproduced in the NAT lab, tests/natlab/).


def _advertised_addrs_factory(addrs_filter: Callable[[list[str]], list[str]]) -> Any:
    """An ``addrs_factory`` for ``new_host`` that advertises what we vouch for.

    Defect (not in the notes): ``BasicHost.get_addrs()`` adds every address
    identify peers *observed* for us (ObservedAddrManager), verified or not.
    Behind a NAT those are the router's ports of our *outbound* connections,
    which nobody can dial, and peers that store them waste dials on them.  The
    node's filter keeps the listen addresses and the addresses a dial-back
    confirmed.  (Relayed addresses must not go through here either: see
    :func:`circuit_addr`.)
    """
    import multiaddr

    def factory(candidates: list[Any]) -> list[Any]:
        out = []
        for text in addrs_filter([str(a) for a in candidates]):
            try:
                out.append(multiaddr.Multiaddr(text))
            except Exception:  # a malformed address from a peer's observation
                log.debug("dropping unparsable address %r", text)
        return out

    return factory


def circuit_addr(relay_addr: str, relay_id: str, peer_id: str) -> str:
    """``<relay transport addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``.

    Defect (not in the notes): ``BasicHost.get_addrs()`` strips "the" /p2p/
    component of each address before appending ours, but looks up the
    *first* one: a relayed address loses everything from the relay's id on
    and becomes ``<relay addr>/p2p/<us>`` -- the relay's address under our id.
    So relayed addresses are appended by the node, never fed to the host.
    """
    return f"{relay_addr}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


def peer_connections(host: Any, peer_id: str) -> list[Any]:
    """The open swarm connections to ``peer_id``."""
    from libp2p.peer.id import ID

    try:
        conns = host.get_network().get_connections(ID.from_base58(peer_id))
    except ValueError:
        return []
    return [c for c in conns if not c.is_closed]


def connection_kind(conn: Any) -> str:
    """``"relayed"`` for a circuit-relay connection, else ``"direct"``.

    ``SwarmConn.get_transport_addresses()`` falls back to the *peerstore's*
    addresses when the connection's own are unknown (which may list relayed
    addresses for a direct connection), so only the connection type and the
    addresses recorded at upgrade time count.
    """
    from libp2p.connection_types import ConnectionType

    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return "relayed"
    except Exception:  # connection types without the method
        pass
    actual = getattr(conn, "_actual_transport_addresses", None) or []
    return "relayed" if any("/p2p-circuit" in str(a) for a in actual) else "direct"


def connection_remote(conn: Any) -> tuple[str, int] | None:
    """The (ip, port) at the other end of a direct connection; None if relayed/unknown."""
    if connection_kind(conn) == "relayed":
        return None
    try:
        remote = conn.muxed_conn.get_remote_address()
    except Exception:  # muxers without the method
        return None
    return (str(remote[0]), int(remote[1])) if remote else None


def connection_local_port(conn: Any) -> int | None:
    """Our local TCP port of a direct connection (None if unknown)."""
    try:
        secured = conn.muxed_conn.secured_conn
        raw = getattr(secured, "conn", None) or getattr(secured, "raw_conn", None)
        stream = getattr(raw, "stream", None)
        sock = getattr(getattr(stream, "stream", None), "socket", None)
        return int(sock.getsockname()[1]) if sock is not None else None
    except Exception:  # any layer missing: not a plain TCP connection
        return None


def stream_kind(raw_stream: Any) -> str:
    """``"relayed"`` or ``"direct"``: the kind of connection a py-libp2p stream rides."""
    from libp2p.connection_types import ConnectionType

    try:
        kind = raw_stream.muxed_conn.get_connection_type()
    except Exception:  # not a muxed stream we know
        return "direct"
    return "relayed" if kind == ConnectionType.RELAYED else "direct"


def tcp_listen_addrs(host: Any) -> list[tuple[str, int]]:
    """The (ip, port) of each TCP listener (ip may be 0.0.0.0)."""
    out = []
    for addr in host.get_transport_addrs():
        text = str(addr)
        parts = text.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            out.append((parts[2], int(parts[4])))
    return out


def _tcp_maddr(ip: str, port: int) -> Any:
    import multiaddr

    family = "ip6" if ":" in ip else "ip4"
    return multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")


async def prove_listener(host: Any, ip: str, port: int, peer_id: str) -> None:
    """A *fresh* TCP connection to (ip, port) and a Noise handshake with ``peer_id``.

    Returns when the peer listening there proved it holds ``peer_id``'s key;
    raises otherwise.  The connection is never registered in the swarm and
    is closed at once.

    Defect 5 (notes): py-libp2p's AutoNAT v1 "dials back" over the existing
    connection and so rates every peer public.  This is the real dial-back.
    """
    from libp2p.peer.id import ID

    swarm = host.get_network()
    maddr = _tcp_maddr(ip, port)
    transport = swarm.transport_manager.transport_for_dialing(maddr)
    if transport is None:
        raise ConnectionError(f"no transport dials {maddr}")
    raw = await transport.dial(maddr)
    try:
        secured = await swarm.upgrader.upgrade_security(raw, True, ID.from_base58(peer_id))
        try:
            await secured.close()
        except Exception:  # closing a session the peer already dropped
            log.debug("closing dial-back session", exc_info=True)
    finally:
        with contextlib.suppress(Exception):  # already closed by the session
            await raw.close()


async def upgrade_relayed_stream(
    host: Any, raw_stream: Any, peer_id: str, relay_id: str, initiator: bool
) -> Any:
    """Turn a relay circuit (a stream to/through the relay) into a swarm connection.

    Noise and Yamux run end to end inside the circuit, so the relay sees
    only ciphertext.  Returns the SwarmConn, tagged RELAYED with its circuit
    address (the generic upgrade cannot know either).
    """
    import multiaddr
    from libp2p.connection_types import ConnectionType
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.peer.id import ID

    circuit = multiaddr.Multiaddr(f"/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}")
    raw = RawConnection(
        stream=raw_stream,
        initiator=initiator,
        connection_type=ConnectionType.RELAYED,
        addresses=[circuit],
    )
    swarm = host.get_network()
    target = ID.from_base58(peer_id)
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
    return conn


def set_raw_stream_handler(host: Any, protocol: str, handler: Any) -> None:
    """Register ``handler(raw py-libp2p stream)`` (for relay/DCUtR wire formats)."""
    host.set_stream_handler(protocol, handler)


async def open_raw_stream(host: Any, peer_id: str, protocol: str) -> Any:
    from libp2p.peer.id import ID

    return await host.new_stream(ID.from_base58(peer_id), [protocol])


def peer_supports(host: Any, peer_id: str, protocol: str) -> bool | None:
    """What identify told us about ``peer_id`` speaking ``protocol`` (None: unknown)."""
    from libp2p.peer.id import ID

    try:
        protocols = host.get_peerstore().get_protocols(ID.from_base58(peer_id))
    except Exception:  # peer not in the peerstore yet
        return None
    if not protocols:
        return None
    return protocol in {str(p) for p in protocols}


def peerstore_addrs(host: Any, peer_id: str) -> list[str]:
    """The addresses py-libp2p's peerstore holds for ``peer_id`` (identify fills it)."""
    from libp2p.peer.id import ID

    try:
        return [str(a) for a in host.get_peerstore().addrs(ID.from_base58(peer_id))]
    except Exception:  # PeerStoreError when the peer is unknown
        return []


async def push_identify(host: Any) -> None:
    """Tell connected peers our protocols and addresses changed.

    Defect (not in the notes): py-libp2p pushes identify only when a listener
    is added; a stream handler registered later (the relay hop service once
    the node turns out to be public) or a newly confirmed address stays
    unknown to connected peers until they reconnect.
    """
    try:
        await host._push_identify_to_all_peers()
    except Exception:  # best effort: peers also learn it on their next identify
        log.debug("identify push failed", exc_info=True)


async def open_punch_socket(ip: str, port: int, source: tuple[str, int]) -> Any:
    """One TCP connect to (ip, port) from our listening ``source`` (SO_REUSEPORT).

    Returns a ``trio.SocketStream``; raises ``OSError`` (refused, reset,
    unreachable).  A plain socket instead of a swarm dial: a hole punch may
    need hundreds of these per second (see holepunch.py), and py-libp2p's dial
    path costs milliseconds and an ERROR log line per refused attempt.
    """
    import socket as stdlib_socket

    import trio

    family = trio.socket.AF_INET6 if ":" in ip else trio.socket.AF_INET
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
        await sock.bind(source)
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def upgrade_punched(host: Any, stream: Any, peer_id: str, as_responder: bool) -> Any:
    """Run Noise + Yamux on a hole-punched TCP stream and register it in the swarm.

    ``as_responder``: take the security responder's role although we called
    connect() (TCP simultaneous open: both ends did; the DCUtR spec gives the
    initiator the responder's role).  Uses the swarm's own upgrade paths, as
    ``Swarm.dial_addr(_as_responder)`` does after its dial.
    """
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.peer.id import ID

    swarm = host.get_network()
    target = ID.from_base58(peer_id)
    remote = stream.socket.getpeername()
    raw = RawConnection(TrioTCPStream(stream), not as_responder)
    try:
        if not as_responder:
            return await swarm.upgrade_outbound_raw_conn(raw, target)
        muxed = await swarm.upgrade_inbound_raw_conn(raw, _tcp_maddr(remote[0], remote[1]))
    except BaseException:
        with contextlib.suppress(Exception):
            await raw.close()
        raise
    if muxed.peer_id != target:
        await muxed.close()
        raise ConnectionError(f"hole punch reached {muxed.peer_id}, not {peer_id}")
    return next((c for c in swarm.get_connections(target) if c.muxed_conn is muxed), None)
