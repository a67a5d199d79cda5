"""Every workaround for py-libp2p 0.8.1, in one place.

gossamer pins ``libp2p==0.8.1``.  Each function below names the defect it
works around (numbers refer to ../shared/LIBP2P-NOTES.md, "Pitfalls found").
When the pin moves, re-check each one against the new release and delete what
the release fixed.  Nothing outside this module reaches into libp2p internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def build_host(identity: Identity, config: NodeConfig, listen_addrs: Sequence[Any]) -> Any:
    """Create the libp2p host (BasicHost) with every workaround applied."""
    from libp2p import new_host
    from libp2p.network.config import ConnectionConfig
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    _patch_dial_delay()
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
    if config.announce:
        import multiaddr

        announce = [multiaddr.Multiaddr(a) for a in config.announce]
    host = new_host(
        key_pair=identity.libp2p_keypair(),
        sec_opt=noise_only_security(identity),
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=list(listen_addrs),
        connection_config=connection_config,
        announce_addrs=announce,
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
        from libp2p.io.exceptions import IOException

        try:
            await self._stream.write(bytes(data) if not isinstance(data, bytes) else data)
        except (IOException, OSError, ValueError) as exc:
            raise ConnectionError(f"stream to {self.peer_id[-8:]} failed: {exc!r}") from None

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
