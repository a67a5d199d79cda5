"""The tensor data plane: encrypted bulk transfer of named buffers between two nodes.

Opening a channel to a peer (``/gossamer/dataplane/1.0.0``, over the Noise
connection the node already has):

1. initiator → responder: ``{v, n: 32 random bytes, d: wants a direct path}``
2. responder → initiator: ``{v, n: 32 random bytes, c: channel id, a: [host, port] | None}``
   Both derive the channel keys (see :mod:`sealing`).
3. If the responder offered an address, the initiator opens a plain TCP
   connection to it, sends the channel id and a HELLO sealed with the hello
   key; the responder answers with a sealed HELLO.  Possession of the key is
   the proof of identity: a dialer without it is dropped.
4. initiator → responder: ``{use: "direct" | "libp2p"}``.  With ``libp2p`` the
   sealed frames ride the handshake stream itself (slower: py-libp2p streams
   top out near 80 MiB/s here), so a data plane exists whenever any libp2p
   connection does, relayed ones included.

Relayed vs direct: the stream opens on the best libp2p connection (py-libp2p
prefers a direct one, e.g. after a hole punch).  Over a relayed connection
the stream's "remote address" is the relay's, so the initiator never dials
it; a node behind a NAT does not offer its direct socket to a peer out on
the internet (that dial could only time out).  The channel's ``path`` is
``direct`` (own TCP socket), ``libp2p`` (a stream on a direct libp2p
connection) or ``relay`` (a stream through a circuit relay).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import wire
from gossamer.node.addresses import is_unspecified, parse_host_port
from gossamer.node.dataplane import sealing
from gossamer.node.dataplane.channel import Channel, SendReport, StaleChannel
from gossamer.node.dataplane.links import LinkEstimates
from gossamer.node.dataplane.mailbox import Mailbox, PendingReceive, Received
from gossamer.node.dataplane.tensors import describe, normalize
from gossamer.node.dataplane.transports import Libp2pTransport, SocketTransport, Transport
from gossamer.node.errors import (
    ChannelClosed,
    DeadlineExceeded,
    IntegrityError,
    PeerUnreachable,
    ProtocolError,
)

if TYPE_CHECKING:
    from gossamer.node.host import Stream
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

PROTOCOL = "/gossamer/dataplane/1.0.0"
VERSION = 1
CHANNEL_ID_BYTES = 16
HELLO_TIMEOUT_S = 5.0
MAX_HANDSHAKE_FRAME = 1024


class _PendingDirect:
    """A channel the responder announced, waiting for the initiator's TCP connection."""

    def __init__(self, peer_id: str, hello_in: sealing.Opener, hello_out: sealing.Sealer) -> None:
        self.peer_id = peer_id
        self.hello_in = hello_in
        self.hello_out = hello_out
        self.transport: SocketTransport | None = None
        self.attached = trio.Event()
        self.finished = trio.Event()


def _keys(
    nonce_i: bytes, nonce_r: bytes, channel_id: bytes, initiator: str, responder: str
) -> dict[str, bytes]:
    i2r, r2i = sealing.derive_keys(nonce_i, nonce_r, channel_id, initiator, responder)
    hello_i2r, hello_r2i = sealing.derive_keys(
        nonce_i, nonce_r, channel_id + b"hello", initiator, responder
    )
    return {"i2r": i2r, "r2i": r2i, "hello_i2r": hello_i2r, "hello_r2i": hello_r2i}


class DataPlane:
    """Send and receive named tensors to and from peers."""

    def __init__(self, node: Node) -> None:
        self._node = node
        config = node.config
        self._mailbox = Mailbox(
            config.dataplane_unsolicited_budget_bytes,
            config.dataplane_unsolicited_timeout,
            per_peer_budget_bytes=config.dataplane_unsolicited_budget_per_peer_bytes,
            complaints=node.complaints,
        )
        self._channels: defaultdict[str, list[Channel]] = defaultdict(list)
        self._handshaking: Counter[str] = Counter()  # inbound channels being set up, per peer
        self.channels_refused = 0
        self._open_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._pending_direct: dict[bytes, _PendingDirect] = {}
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None
        # One worker thread sending and one receiving bulk frames at a time:
        # a sender takes its slot before a message's BEGIN (Channel._send_slot),
        # so a receiving slot only waits on a sender that is sending to it and
        # these slots cannot deadlock; more threads only add GIL contention
        # (measured in the all-reduce: +40% CPU with 6 at once).
        self._thread_limiters = (trio.CapacityLimiter(1), trio.CapacityLimiter(1))
        self.listen_port = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        # round trips and rates measured on our sends, per peer: the deadlines above us
        self.links = LinkEstimates()

    # ---------------------------------------------------------------- lifecycle

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        host, port = parse_host_port(self._node.config.dataplane_listen, what="dataplane_listen")
        self._listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.listen_port = self._listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._serve_direct, self._listeners)
        nursery.start_soon(self._expire_unclaimed)
        self._node.set_stream_handler(PROTOCOL, self._serve_handshake)

    async def aclose(self) -> None:
        for channels in list(self._channels.values()):
            for channel in list(channels):
                await channel.aclose("node stopping")
        for listener in self._listeners:
            await listener.aclose()

    def forget_peer(self, peer_id: str) -> None:
        """The libp2p connection is gone: its channels go with it."""
        for channel in self._channels.pop(peer_id, []):
            if self._nursery is not None:
                self._nursery.start_soon(channel.aclose, "peer disconnected")

    def status(self) -> dict[str, Any]:
        return {
            "listen_port": self.listen_port,
            "channels": {
                peer[-8:]: [c.path for c in channels] for peer, channels in self._channels.items()
            },
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "unsolicited_bytes": self._mailbox.unsolicited_bytes,
        }

    def channel_paths(self, peer_id: str) -> list[str]:
        return [c.path for c in self._channels.get(peer_id, []) if not c.closed.is_set()]

    # --------------------------------------------------------------------- API

    async def send(
        self,
        peer_id: str,
        tag: str,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        timeout: float | None = None,
    ) -> SendReport:
        """Send named tensors/arrays/bytes to ``peer_id`` under ``tag``.

        Returns once the peer has verified every byte.  The buffers are read in
        place (no copy) and must not change until this returns.
        """
        items = [describe(name, obj) for name, obj in normalize(tensors)]
        with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
            channel = await self._channel_to(peer_id)
            try:
                report = await channel.send(tag, items)
            except StaleChannel:
                # The peer closed this channel while it sat idle; nothing of the
                # message left us, so one retry on a fresh channel is safe.
                report = await (await self._channel_to(peer_id)).send(tag, items)
            self.bytes_sent += report.nbytes
            self.links.observe(peer_id, report.nbytes, report.seconds, trio.current_time())
            return report
        assert scope.cancelled_caught
        raise DeadlineExceeded(f"sending {tag!r} to {peer_id[-8:]} took longer than {timeout} s")

    def post_recv(
        self, peer_id: str | None, tag: str, into: Mapping[str, Any] | None = None
    ) -> PendingReceive:
        """Post a receive ahead of the message (zero-copy into ``into`` when given).

        ``peer_id=None`` accepts the tag from any peer.  Await ``.wait(timeout)``.
        """
        return self._mailbox.post(peer_id, tag, dict(into) if into is not None else None)

    async def recv(
        self,
        peer_id: str | None,
        tag: str,
        into: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Received:
        """Wait for the message ``tag`` from ``peer_id``; see :meth:`post_recv`."""
        return await self.post_recv(peer_id, tag, into).wait(timeout)

    def drop(self, tag_prefix: str) -> int:
        """Abandon every receive and early arrival whose tag starts with ``tag_prefix``."""
        return self._mailbox.drop(tag_prefix)

    def guard(self, tag_prefix: str, allowed: Callable[[str], bool] | None) -> None:
        """Accept messages whose tag starts with ``tag_prefix`` only from peers ``allowed``
        admits (None: remove the guard). A refused sender's transfer fails with the reason
        and costs us no buffer; one log line per peer and interval. How a run's collective
        keeps its tags to the members its charter admits."""
        self._mailbox.guard(tag_prefix, allowed)

    async def _expire_unclaimed(self) -> None:
        max_age = 2 * self._node.config.dataplane_unsolicited_timeout
        while True:
            await trio.sleep(max_age / 4)
            self._mailbox.expire(max_age)

    # ------------------------------------------------------------ channel setup

    async def _channel_to(self, peer_id: str) -> Channel:
        if peer_id == self._node.peer_id:
            raise PeerUnreachable("the data plane does not send to its own node")
        async with self._open_locks[peer_id]:
            for channel in self._channels.get(peer_id, []):
                if not channel.closed.is_set():
                    return channel
            return await self._open_channel(peer_id)

    async def _open_channel(self, peer_id: str) -> Channel:
        config = self._node.config
        stream = await self._node.open_stream(peer_id, PROTOCOL)
        reader = wire.FrameReader(stream)
        try:
            with trio.fail_after(config.dial_timeout):
                nonce_i = os.urandom(32)
                await stream.write(
                    wire.frame(
                        wire.pack({"v": VERSION, "n": nonce_i, "d": config.dataplane_direct})
                    )
                )
                reply = await _read_map(reader)
                nonce_r, channel_id, offer = reply.get("n"), reply.get("c"), reply.get("a")
                if not _is_bytes(nonce_r, 32) or not _is_bytes(channel_id, CHANNEL_ID_BYTES):
                    raise ProtocolError("handshake reply lacks its nonce or channel id")
                keys = _keys(nonce_i, nonce_r, channel_id, self._node.peer_id, peer_id)
                transport: Transport | None = None
                relayed = stream.relayed
                if offer is not None and config.dataplane_direct:
                    target = _direct_target(offer, None if relayed else stream.remote_address())
                    if target is not None:
                        transport = await self._dial_direct(target, channel_id, keys)
                use = "direct" if transport is not None else "libp2p"
                await stream.write(wire.frame(wire.pack({"use": use})))
        except (trio.TooSlowError, ProtocolError, EOFError, ConnectionError) as exc:
            await stream.reset()
            raise PeerUnreachable(
                f"data-plane handshake with {peer_id[-8:]} failed: {exc}"
            ) from None
        if transport is None:
            transport = Libp2pTransport(stream, reader)
            if relayed:
                transport.path = "relay"
        else:
            await stream.close()
        channel = self._make_channel(peer_id, transport, keys["i2r"], keys["r2i"])
        assert self._nursery is not None
        self._nursery.start_soon(self._run_channel, channel, None)
        log.debug("data channel %d to %s over %s", channel.number, peer_id[-8:], channel.path)
        return channel

    async def _dial_direct(
        self, target: tuple[str, int], channel_id: bytes, keys: dict[str, bytes]
    ) -> SocketTransport | None:
        """Open and authenticate the direct TCP path; None when it cannot be had."""
        transport: SocketTransport | None = None
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                transport = SocketTransport(
                    await trio.open_tcp_stream(*target), shaper=self._node.shaper
                )
                hello = sealing.Sealer(keys["hello_i2r"]).seal(
                    sealing.HELLO, wire.pack({"c": channel_id})
                )
                await transport.send_all(channel_id + hello)
                header, sealed = await _read_hello(transport)
                sealing.Opener(keys["hello_r2i"]).open(header, sealed)
                return transport
        except (
            OSError,
            trio.TooSlowError,
            EOFError,
            IntegrityError,
            ProtocolError,
            ChannelClosed,
        ) as exc:
            log.info("direct data path to %s:%d unavailable (%s); using libp2p", *target, exc)
            if transport is not None:
                await transport.aclose()
            return None

    def _make_channel(self, peer_id: str, transport: Transport, out_key: bytes, in_key: bytes):
        config = self._node.config
        channel = Channel(
            peer_id,
            transport,
            sealing.Sealer(out_key),
            sealing.Opener(in_key),
            self._mailbox.claim,
            chunk_bytes=config.dataplane_chunk_bytes,
            limiters=self._thread_limiters,
            max_message_bytes=config.dataplane_max_message_bytes,
            on_violation=lambda why: self._node.misbehaved(
                log, peer_id, 10, "data channel from %s closed: %s", peer_id[-8:], why
            ),
        )
        self._channels[peer_id].append(channel)
        return channel

    async def _run_channel(self, channel: Channel, finished: trio.Event | None) -> None:
        try:
            await channel.run()
        finally:
            self.bytes_received += channel.bytes_received
            channels = self._channels.get(channel.peer_id)
            if channels and channel in channels:
                channels.remove(channel)
                if not channels:
                    del self._channels[channel.peer_id]
            if finished is not None:
                finished.set()

    # -------------------------------------------------------- responder side

    async def _serve_handshake(self, stream: Stream) -> None:
        config = self._node.config
        peer_id = stream.peer_id
        refusal = channel_admission(
            open_for_peer=len(self._channels.get(peer_id, [])) + self._handshaking[peer_id],
            open_total=sum(len(c) for c in self._channels.values())
            + sum(self._handshaking.values()),
            per_peer=config.dataplane_max_channels_per_peer,
            total=config.dataplane_max_channels,
        )
        if refusal is not None:
            self._node.misbehaved(
                log, peer_id, 5, "data plane: refused a channel from %s: %s", peer_id[-8:], refusal
            )
            self.channels_refused += 1
            await stream.reset()
            return
        self._handshaking[peer_id] += 1
        counted = True

        def registered() -> None:  # from here on the channel counts in self._channels
            nonlocal counted
            if counted:
                counted = False
                self._handshaking[peer_id] -= 1
                if not self._handshaking[peer_id]:
                    del self._handshaking[peer_id]

        try:
            await self._handshake_and_run(stream, registered)
        finally:
            registered()

    async def _handshake_and_run(self, stream: Stream, registered: Callable[[], None]) -> None:
        config = self._node.config
        peer_id = stream.peer_id
        reader = wire.FrameReader(stream)
        channel_id = os.urandom(CHANNEL_ID_BYTES)
        pending: _PendingDirect | None = None
        try:
            with trio.fail_after(config.dial_timeout + HELLO_TIMEOUT_S):
                hello = await _read_map(reader)
                nonce_i = hello.get("n")
                if hello.get("v") != VERSION or not _is_bytes(nonce_i, 32):
                    raise ProtocolError("data-plane handshake has a bad version or nonce")
                nonce_r = os.urandom(32)
                keys = _keys(nonce_i, nonce_r, channel_id, peer_id, self._node.peer_id)
                offer = None
                relayed = stream.relayed
                if hello.get("d") is True and config.dataplane_direct and self._offer_to(stream):
                    offer = self._direct_offer()
                    pending = _PendingDirect(
                        peer_id,
                        sealing.Opener(keys["hello_i2r"]),
                        sealing.Sealer(keys["hello_r2i"]),
                    )
                    self._pending_direct[channel_id] = pending
                await stream.write(
                    wire.frame(wire.pack({"v": VERSION, "n": nonce_r, "c": channel_id, "a": offer}))
                )
                decision = (await _read_map(reader)).get("use")
                if decision == "direct":
                    if pending is None or not pending.attached.is_set():
                        raise ProtocolError("peer chose a direct path that never authenticated")
                elif decision != "libp2p":
                    raise ProtocolError(f"unknown data path {decision!r}")
        except (trio.TooSlowError, ProtocolError, EOFError, ConnectionError) as exc:
            self._node.misbehaved(
                log, peer_id, 10, "data-plane handshake from %s failed: %s", peer_id[-8:], exc
            )
            self._pending_direct.pop(channel_id, None)
            if pending is not None and pending.transport is not None:
                pending.finished.set()
            await stream.reset()
            return
        self._pending_direct.pop(channel_id, None)
        if decision == "direct":
            assert pending is not None and pending.transport is not None
            await stream.close()
            transport: Transport = pending.transport
            finished = pending.finished
        else:
            if pending is not None:
                pending.finished.set()
            transport = Libp2pTransport(stream, reader)
            if relayed:
                transport.path = "relay"
            finished = None
        channel = self._make_channel(peer_id, transport, keys["r2i"], keys["i2r"])
        registered()
        # The handshake stream's task runs the channel: py-libp2p keeps a stream
        # alive only while its handler runs, which the libp2p path needs.
        await self._run_channel(channel, finished)

    def _offer_to(self, stream: Stream) -> bool:
        """Offer our direct socket unless we are behind a NAT and the peer is outside it."""
        reachability = self._node.reachability
        if reachability is None or self._node.config.dataplane_announce:
            return True
        if stream.relayed:
            return True  # the initiator will not dial a relay's address anyway
        remote = stream.remote_address()
        return reachability.dataplane_reachable_from(remote[0] if remote else None)

    def _direct_offer(self) -> list[Any] | None:
        announce = self._node.config.dataplane_announce
        if announce:
            host, port = parse_host_port(announce, what="dataplane_announce")
            return [host, port]
        # "" = "the address you reached me at" (the initiator fills it in)
        return ["", self.listen_port]

    async def _serve_direct(self, socket_stream: trio.SocketStream) -> None:
        transport = SocketTransport(socket_stream, shaper=self._node.shaper)
        try:
            remote = socket_stream.socket.getpeername()
        except OSError:
            remote = ("?", 0)
        pending: _PendingDirect | None = None
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                channel_id = bytearray(CHANNEL_ID_BYTES)
                await transport.receive_into(memoryview(channel_id))
                pending = self._pending_direct.get(bytes(channel_id))
                if pending is None or pending.attached.is_set():
                    raise ProtocolError("unknown or already used channel id")
                header, sealed = await _read_hello(transport)
                body = wire.unpack(pending.hello_in.open(header, sealed))
                if not isinstance(body, dict) or body.get("c") != bytes(channel_id):
                    raise ProtocolError("HELLO names another channel")
                reply = pending.hello_out.seal(sealing.HELLO, wire.pack({"c": bytes(channel_id)}))
                await transport.send_all(reply)
        except (trio.TooSlowError, ProtocolError, IntegrityError, EOFError, ChannelClosed) as exc:
            log.warning("refused direct data connection from %s:%s: %s", remote[0], remote[1], exc)
            await transport.aclose()
            return
        pending.transport = transport
        pending.attached.set()
        # The channel (run by the handshake task) owns the socket from here;
        # this task only keeps serve_listeners from forgetting it.
        await pending.finished.wait()
        if not pending.finished.is_set() or pending.transport is transport:
            await transport.aclose()


async def _read_hello(transport: SocketTransport) -> tuple[bytes, bytearray]:
    """(header, sealed body) of the HELLO frame that must come first on a direct path."""
    header = bytearray(sealing.HEADER.size)
    await transport.receive_into(memoryview(header))
    frame_type, size = sealing.parse_header(bytes(header), MAX_HANDSHAKE_FRAME)
    if frame_type != sealing.HELLO:
        raise ProtocolError("the direct path did not start with HELLO")
    sealed = bytearray(size)
    await transport.receive_into(memoryview(sealed))
    return bytes(header), sealed


async def _read_map(reader: wire.FrameReader) -> dict[str, Any]:
    payload = await reader.read_frame(MAX_HANDSHAKE_FRAME, "handshake")
    if payload is None:
        raise EOFError("stream closed during the data-plane handshake")
    message = wire.unpack(payload)
    if not isinstance(message, dict):
        raise ProtocolError("handshake message must be a map")
    return message


def _is_bytes(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _direct_target(offer: Any, remote: tuple[str, int] | None) -> tuple[str, int] | None:
    """Where to dial the peer's data port: its announced host, or the host we reached."""
    if (
        not isinstance(offer, list)
        or len(offer) != 2
        or not isinstance(offer[0], str)
        or len(offer[0]) > 255
        or not isinstance(offer[1], int)
        or not 0 < offer[1] < 65536
    ):
        raise ProtocolError("malformed direct-path offer")
    host, port = offer
    if not host or is_unspecified(host):
        if remote is None:
            return None  # relayed or unknown: no address to dial
        host = remote[0]
    return host, port


def channel_admission(
    *, open_for_peer: int, open_total: int, per_peer: int, total: int
) -> str | None:
    """Why an inbound channel must be refused (None: admit it).  Pure.

    Every channel costs buffers and a reader task, so one peer gets at most ``per_peer`` (a
    peer needs one per direction, and one more while a stale one is replaced) and all peers
    together ``total``.
    """
    if open_for_peer >= per_peer:
        return f"it has {open_for_peer} channels open (at most {per_peer} per peer)"
    if open_total >= total:
        return f"{open_total} channels are open (at most {total})"
    return None
