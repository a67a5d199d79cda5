"""Hole punching: upgrade relayed connections to direct ones (DCUtR over TCP).

When a connection to a peer exists only through a relay, the two nodes run
the DCUtR exchange (``/libp2p/dcutr``, the spec's protobuf messages) over
it:

1. the initiator sends CONNECT with the addresses it predicts it can be
   reached at, and times the round trip;
2. the responder answers CONNECT with its own;
3. the initiator sends SYNC and waits half the round trip;
4. **both** dial every address of the other at once, from their own
   listening port (SO_REUSEPORT).  Each SYN opens its sender's NAT mapping
   for the other's address; the later SYN passes the earlier side's mapping
   and the two meet in one TCP connection (simultaneous open) or a plain
   accept.  The initiator runs the security handshake as the responder, as
   the spec says, so the two Noise roles differ whichever way the SYNs met.

Predicted addresses are ``<public IP helpers observed us at>:<listen port>``
(a cone NAT keeps the source port of a connection from the listening port)
plus non-loopback listen addresses for peers on the same LAN.

The side that *accepted* the relayed connection initiates at once; the side
that dialed it initiates too if nothing happened after
:data:`DIALER_GRACE_S` ("both sides attempt").  A failed attempt is retried
``holepunch_attempts`` times with backoff.  If all fail (a symmetric NAT
picks a new port per destination, so the prediction is wrong) the traffic
stays on the relay and the node says so: a warning in the log and
``status()["holepunch"][peer] = {"state": "relayed", "reason": ...}``.

After an upgrade the relayed connection is closed ``holepunch_relay_grace``
seconds later, and idle RPC streams that rode it are dropped at once, so new
RPC and data-plane streams open on the direct connection.

From py-libp2p 0.8.1 this uses the DCUtR protobuf messages and the swarm's
connection upgrades (``upgrade_outbound_raw_conn`` / ``upgrade_inbound_raw_conn``,
as its ``dial_addr_as_responder`` does); the connects themselves are plain
sockets (hundreds per second may be needed behind routers that answer RST).
Its ``DCUtRProtocol`` service was measured in the same lab
(``gossamer bench nat --dcutr py-libp2p``): behind firewalled cone NATs it
succeeds (20/20) but only after ~1.6 s (its auto-drive loop polls every 2 s
and tries a unilateral dial first), behind routers that answer RST it never
does (0/5: one connect per address per round), it keeps the relayed
connection 60 s after an upgrade, predicts addresses from identify's
unverified observations, allows 3 attempts per peer, and exposes no
per-peer outcome for ``status()``.

A hostile peer must not turn this into a reflection tool (a peer names the
addresses we dial, and a refused connect is repeated at once).  So the
responder answers only on a stream that rides a relayed connection from a peer
we have no direct connection to (:func:`responder_refusal`: an upgrade is what
the exchange is for); :class:`PunchBudget` admits at most
``holepunch_sessions_per_peer`` sessions per peer and ``holepunch_sessions_per_minute``
in all per :data:`BUDGET_WINDOW_S` (the initiator keeps its own budget, so a peer that
reconnects through a relay again and again is bounded as well); one session
makes at most ``holepunch_max_connects`` connects, re-dials included
(:class:`DialAllowance`); and :func:`dial_targets` keeps the address scope
(loopback only when we listen on loopback, LAN addresses only when we may be on
a LAN, never multicast, link-local or unspecified).  A refused session is
closed without an answer, counted in ``HolePuncher.refused`` and logged at most
once per peer per minute (``node.complaints``).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node import _libp2p_compat as compat
from gossamer.node.host import raw_stream_kind, raw_stream_peer
from gossamer.node.reachability import Reachability, is_public_ip, tcp_multiaddr

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

DCUTR_PROTOCOL = "/libp2p/dcutr"
DIALER_GRACE_S = 1.5
MESSAGE_TIMEOUT_S = 10.0
MAX_ADDRS = 8
MAX_STATES = 512
REDIAL_JITTER_S = 0.004  # between re-dials after an RST (see HolePuncher._dial_all)
# What one peer, and all peers together, can make us dial (see the module docs).
BUDGET_WINDOW_S = 60.0
SESSIONS_PER_PEER = 3  # sessions we answer per peer per window (at least holepunch_attempts)
SESSIONS_TOTAL = 60  # ... and from all peers together
MAX_CONNECTS_PER_SESSION = 256  # TCP connects one session may make, re-dials after RST included
MAX_BUDGET_PEERS = 4096  # peers a budget remembers (those with nothing left in the window go)
_GLOBAL = "*dcutr*"  # the complaints key for refusals that no single peer caused

REFUSALS = {
    "not-relayed": "the stream does not ride a relayed connection",
    "direct": "a direct connection exists: nothing to upgrade",
    "peer-budget": "too many sessions with this peer in the last minute",
    "busy": "too many sessions in all in the last minute",
}


@dataclass
class PunchState:
    """What hole punching did for one peer."""

    peer_id: str
    # relayed: only a relayed connection, no attempt yet; punching; direct;
    # failed: the last attempt failed and the traffic stays on the relay
    state: str = "relayed"
    role: str = ""  # initiator | responder
    attempts: int = 0
    reason: str = ""
    relayed_at: float | None = None  # monotonic: when the relayed connection appeared
    upgrade_ms: float | None = None  # relayed -> direct
    concluded_at: float = 0.0  # monotonic: when the last punch() ended

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "role": self.role,
            "attempts": self.attempts,
            "reason": self.reason,
            "upgrade_ms": None if self.upgrade_ms is None else round(self.upgrade_ms, 1),
        }


def predicted_addrs(
    listen: list[tuple[str, int]], external_ips: list[str], confirmed: list[str]
) -> list[str]:
    """Addresses to put in our DCUtR CONNECT (pure).

    ``external_ips`` paired with each listening port (a port-preserving NAT),
    dial-back-confirmed addresses, and specific (LAN, loopback) listen addresses.
    """
    out: list[str] = []
    for addr in confirmed:
        if addr not in out:
            out.append(addr)
    for ip in external_ips:
        for _, port in listen:
            addr = tcp_multiaddr(ip, port)
            if addr not in out:
                out.append(addr)
    for ip, port in listen:
        if ip in ("0.0.0.0", "::"):
            continue
        addr = tcp_multiaddr(ip, port)
        if addr not in out:
            out.append(addr)
    return out[:MAX_ADDRS]


def address_scope(ip: str) -> str | None:
    """``"loopback"``, ``"lan"`` (private ranges), ``"public"`` or None (never dialed:
    unspecified, multicast, link-local, broadcast, reserved or not an address) (pure)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_loopback:
        return "loopback"
    if is_public_ip(ip):
        return "public"
    if addr.is_unspecified or addr.is_multicast or addr.is_link_local or addr.is_reserved:
        return None
    return "lan" if addr.is_private else None


def dial_targets(
    addrs: list[str], own_ips: set[str], loopback: bool = False, lan: bool = True
) -> list[tuple[str, int]]:
    """(ip, port) worth dialing among a peer's CONNECT addresses (pure).

    Never our own addresses; loopback addresses only when we listen on loopback
    ourselves (one machine); LAN addresses only when ``lan`` (we may be on one);
    nothing outside those scopes and the public internet.
    """
    out: list[tuple[str, int]] = []
    for addr in addrs[:MAX_ADDRS]:
        parts = addr.split("/")
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            continue
        ip = parts[2]
        try:
            port = int(parts[4])
        except ValueError:
            continue
        if not 0 < port < 65536 or ip in own_ips:
            continue
        scope = address_scope(ip)
        if scope is None or (scope == "loopback" and not loopback) or (scope == "lan" and not lan):
            continue
        if (ip, port) not in out:
            out.append((ip, port))
    return out


def scopes_of(own_ips: Collection[str]) -> tuple[bool, bool]:
    """(loopback, lan): the scopes we can reach peers in, from the addresses we listen and are
    seen at (pure).  A wildcard listener may be on a LAN; a loopback-only node is on none."""
    loopback = any(address_scope(ip) == "loopback" for ip in own_ips)
    lan = any(ip in ("0.0.0.0", "::") or address_scope(ip) == "lan" for ip in own_ips)
    return loopback, lan


# ------------------------------------------------ what a peer may make us do (pure)


def responder_refusal(stream_kind: str, kinds: Collection[str]) -> str | None:
    """Why we do not answer a DCUtR stream (a key of :data:`REFUSALS`), or None (pure).

    Only a stream riding a relayed connection, from a peer we reach only through a relay,
    is an upgrade in progress; anything else would be a peer asking us to dial for it.
    """
    if stream_kind != "relayed" or "relayed" not in kinds:
        return "not-relayed"
    if "direct" in kinds:
        return "direct"
    return None


class PunchBudget:
    """DCUtR sessions admitted per peer and in all per sliding window (pure: the clock is
    injected).  Only admitted sessions count, so the memory is bounded by ``total``."""

    def __init__(
        self,
        per_peer: int = SESSIONS_PER_PEER,
        total: int = SESSIONS_TOTAL,
        window: float = BUDGET_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_peer = per_peer
        self.total = total
        self.window = window
        self._clock = clock
        self._all: deque[float] = deque()
        self._peers: OrderedDict[str, deque[float]] = OrderedDict()  # by last admission

    def admit(self, peer_id: str) -> str | None:
        """None, and the session counts; else ``"peer-budget"`` or ``"busy"``."""
        now = self._clock()
        self._expire(now)
        times = self._peers.get(peer_id)
        if times is not None:
            while times and now - times[0] >= self.window:
                times.popleft()
            if len(times) >= self.per_peer:
                return "peer-budget"
        if len(self._all) >= self.total:
            return "busy"
        if times is None:
            times = self._peers[peer_id] = deque()
        times.append(now)
        self._peers.move_to_end(peer_id)
        self._all.append(now)
        while len(self._peers) > MAX_BUDGET_PEERS:
            self._peers.popitem(last=False)
        return None

    def used(self, peer_id: str) -> int:
        """Sessions ``peer_id`` has in the current window."""
        now = self._clock()
        return sum(1 for t in self._peers.get(peer_id, ()) if now - t < self.window)

    def _expire(self, now: float) -> None:
        while self._all and now - self._all[0] >= self.window:
            self._all.popleft()
        while self._peers:
            oldest = next(iter(self._peers.values()))
            if oldest and now - oldest[-1] < self.window:
                break
            self._peers.popitem(last=False)


class DialAllowance:
    """The TCP connects one session may still make (re-dials included)."""

    def __init__(self, connects: int = MAX_CONNECTS_PER_SESSION) -> None:
        self.left = connects

    def take(self) -> bool:
        """True (and one fewer left) if one more connect is allowed."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


# ------------------------------------------------- who punches, and when (pure)


def on_connection(kinds: Collection[str], known: PunchState | None) -> str:
    """What a new connection to a peer means for hole punching (pure).

    ``"upgraded"``: a direct connection now exists where we knew a relayed one;
    ``"relayed"``: only relayed connections, so consider punching; ``"nothing"``.
    """
    if "direct" in kinds:
        if known is not None and known.relayed_at is not None and known.state != "direct":
            return "upgraded"
        return "nothing"
    return "relayed" if "relayed" in kinds else "nothing"


def starts_afresh(state: PunchState) -> bool:
    """A relayed connection after a concluded (or no) punch starts a new count of attempts."""
    return state.relayed_at is None or state.state in ("direct", "failed")


def dialer_initiates(kinds: Collection[str], role: str, responding: bool) -> bool:
    """After :data:`DIALER_GRACE_S`, the side that *dialed* the relayed connection initiates
    only if the accepting side has not started (we are not its responder) and the connection
    is still relayed only (pure)."""
    if role == "responder" or responding:
        return False
    return "relayed" in kinds and "direct" not in kinds


def after_attempt(ok: bool, kinds: Collection[str]) -> str:
    """``"direct"`` (done), ``"closed"`` (the relayed connection went: stop) or ``"retry"``."""
    if ok or "direct" in kinds:
        return "direct"
    return "closed" if "relayed" not in kinds else "retry"


def retry_delay(attempt: int) -> float:
    """Seconds before the attempt after 0-based ``attempt``: 0.5, 1, 2, … (pure)."""
    return 0.5 * 2**attempt


def responder_failure(targets: Sequence[tuple[str, int]]) -> str:
    """Why a responder's dials made no direct connection."""
    if targets:
        return f"no direct connection to {_fmt(list(targets))}"
    return "peer sent no address we could dial"


class HolePuncher:
    def __init__(self, node: Node, reachability: Reachability) -> None:
        self._node = node
        self._reachability = reachability
        self.states: OrderedDict[str, PunchState] = OrderedDict()
        self._locks: dict[str, trio.Lock] = {}
        self._active: set[str] = set()
        self._responding: dict[str, trio.CancelScope] = {}
        # An honest initiator makes holepunch_attempts sessions per relayed connection.
        config = node.config
        attempts = max(1, config.holepunch_attempts)
        self._answers = PunchBudget(  # the sessions we answer
            per_peer=max(config.holepunch_sessions_per_peer, attempts),
            total=config.holepunch_sessions_per_minute,
        )
        # Sessions we start: a peer that reconnects through a relay again and again makes us
        # initiate each time.
        self._initiations = PunchBudget(
            per_peer=2 * attempts, total=config.holepunch_sessions_per_minute
        )
        self.refused: Counter[str] = Counter()  # refusal code -> sessions refused
        self.connects = 0  # hole-punch TCP connects made, re-dials included

    def start(self) -> None:
        node = self._node
        node.host.set_stream_handler(DCUTR_PROTOCOL, self._handle)
        node.add_connection_listener(self._on_connection)

    def status(self) -> dict[str, Any]:
        return {peer[-8:]: s.to_dict() for peer, s in self.states.items()}

    def state_of(self, peer_id: str) -> PunchState | None:
        return self.states.get(peer_id)

    def _state(self, peer_id: str) -> PunchState:
        state = self.states.get(peer_id)
        if state is None:
            state = self.states[peer_id] = PunchState(peer_id)
            while len(self.states) > MAX_STATES:
                self.states.popitem(last=False)
        return state

    # -------------------------------------------------------------- triggers

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if connected and self._node.config.holepunch:
            self._node.nursery.start_soon(self._consider, peer_id)

    async def _consider(self, peer_id: str) -> None:
        await trio.sleep(0.05)  # the swarm tags a relayed connection right after upgrade
        node = self._node
        known = self.states.get(peer_id)
        meaning = on_connection(node.connection_kinds(peer_id), known)
        if meaning == "upgraded":
            assert known is not None
            self._mark_direct(known)
        if meaning != "relayed":
            return
        state = self._state(peer_id)
        if starts_afresh(state):
            state.relayed_at = time.monotonic()
            state.state, state.attempts, state.reason, state.role = "relayed", 0, "", ""
        if node.relayed_direction(peer_id) != "inbound":
            # The accepting side starts; we start too if it has not.
            await trio.sleep(DIALER_GRACE_S)
            kinds = node.connection_kinds(peer_id)
            if not dialer_initiates(kinds, state.role, peer_id in self._active):
                return  # the accepting side drives the retries, or nothing is left to punch
        await self.punch(peer_id)

    # ------------------------------------------------------------- initiator

    async def punch(self, peer_id: str) -> bool:
        """Try to make the connection to ``peer_id`` direct; True on success."""
        lock = self._locks.setdefault(peer_id, trio.Lock())
        asked_at = time.monotonic()
        async with lock:
            state = self._state(peer_id)
            if state.concluded_at > asked_at and state.state in ("direct", "failed"):
                return state.state == "direct"  # a run that just ended answered this request
            try:
                return await self._punch_locked(peer_id, state)
            finally:
                state.concluded_at = time.monotonic()

    async def _punch_locked(self, peer_id: str, state: PunchState) -> bool:
        node = self._node
        if "direct" in node.connection_kinds(peer_id):
            self._mark_direct(state)
            return True
        if "relayed" not in node.connection_kinds(peer_id):
            return False
        state.role = "initiator"
        attempts = node.config.holepunch_attempts
        for attempt in range(attempts):
            refusal = self._initiations.admit(peer_id)
            if refusal is not None:
                state.reason = f"hole-punch budget spent ({REFUSALS[refusal]})"
                self._mark_failed(state)
                return False
            state.attempts += 1
            state.state = "punching"
            self._active.add(peer_id)
            try:
                ok, reason = await self._initiate(peer_id)
            finally:
                self._active.discard(peer_id)
            outcome = after_attempt(ok, node.connection_kinds(peer_id))
            if outcome == "direct":
                self._mark_direct(state)
                return True
            state.reason = reason
            if outcome == "closed":
                state.state = "failed"
                state.reason = f"{reason}; the relayed connection closed"
                return False
            if attempt + 1 < attempts:
                await trio.sleep(retry_delay(attempt))
        self._mark_failed(state)
        return False

    async def _initiate(self, peer_id: str) -> tuple[bool, str]:
        HolePunch = compat.dcutr_hole_punch()
        node = self._node
        try:
            stream = await node.host.new_stream(peer_id, DCUTR_PROTOCOL)
        except Exception as exc:  # the peer does not speak DCUtR, or the relay went
            return False, f"cannot open DCUtR stream: {exc!r}"[:160]
        try:
            ours = self._our_addrs()
            with trio.fail_after(MESSAGE_TIMEOUT_S):
                start = time.perf_counter()
                await _write(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=_encode(ours)))
                answer = await _read(stream)
                rtt = time.perf_counter() - start
                if answer.type != HolePunch.CONNECT:
                    return False, "peer answered CONNECT with something else"
                theirs = _decode(answer.ObsAddrs)
                await _write(stream, HolePunch(type=HolePunch.SYNC))
            targets = self._targets(theirs)
            if not targets:
                return False, "peer sent no address we could dial"
            await trio.sleep(min(rtt / 2, 2.0))
            timeout = node.config.holepunch_timeout
            if await self._dial_all(peer_id, targets, as_responder=True, timeout=timeout):
                return True, ""
            return False, f"no direct connection to {_fmt(targets)} within {timeout:g} s"
        except trio.TooSlowError:
            return False, "DCUtR exchange timed out"
        except Exception as exc:  # stream reset: the relay or the peer went away
            return False, f"DCUtR exchange failed: {exc!r}"[:160]
        finally:
            await _close(stream)

    # ------------------------------------------------------------- responder

    async def _handle(self, stream: Any) -> None:
        node = self._node
        try:
            peer_id = raw_stream_peer(stream)
        except Exception:  # a stream without a peer id: nothing to answer
            await _close(stream)
            return
        if not node.config.holepunch:
            await _close(stream)
            return
        refusal = responder_refusal(raw_stream_kind(stream), node.connection_kinds(peer_id))
        if refusal is None:
            refusal = self._answers.admit(peer_id)
        if refusal is not None:
            self._refuse(peer_id, refusal)
            await _close(stream)
            return
        state = self._state(peer_id)
        if state.relayed_at is None:
            state.relayed_at = time.monotonic()
        # A new session from the same peer supersedes the old one, whose dials
        # would otherwise hold the same source and destination ports.
        previous = self._responding.pop(peer_id, None)
        if previous is not None:
            previous.cancel()
        self._active.add(peer_id)
        try:
            with trio.CancelScope() as scope:
                self._responding[peer_id] = scope
                await self._respond(stream, peer_id, state)
        finally:
            if self._responding.get(peer_id) is scope:
                del self._responding[peer_id]
            self._active.discard(peer_id)
            await _close(stream)

    async def _respond(self, stream: Any, peer_id: str, state: PunchState) -> None:
        HolePunch = compat.dcutr_hole_punch()
        node = self._node
        state.role = "responder"
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S):
                message = await _read(stream)
                if message.type != HolePunch.CONNECT:
                    return
                theirs = _decode(message.ObsAddrs)
                ours = _encode(self._our_addrs())
                await _write(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=ours))
                sync = await _read(stream)
                if sync.type != HolePunch.SYNC:
                    return
            state.role = "responder"
            state.attempts += 1
            state.state = "punching"
            if "direct" in node.connection_kinds(peer_id):  # it came direct meanwhile
                self._mark_direct(state)
                return
            targets = self._targets(theirs)
            # Outlive the initiator's dials: if our SYN waits in its NAT until
            # its socket gave up, its listener must still find ours open.
            timeout = node.config.holepunch_timeout + 1.0
            punched = bool(targets) and await self._dial_all(peer_id, targets, False, timeout)
            if punched or "direct" in node.connection_kinds(peer_id):
                self._mark_direct(state)
            else:
                state.state, state.reason = "failed", responder_failure(targets)
        except trio.TooSlowError:
            state.state, state.reason = "failed", "DCUtR exchange timed out"
        except Exception as exc:  # reset by the peer or the relay
            state.state, state.reason = "failed", f"DCUtR exchange failed: {exc!r}"[:160]

    # ------------------------------------------------------------------ dials

    def _our_addrs(self) -> list[str]:
        node = self._node
        listen = node.host.tcp_listeners()
        verdict = self._reachability.verdict
        return predicted_addrs(
            listen, self._reachability.external_ips(), list(verdict.confirmed_addrs)
        )

    def _own_ips(self) -> set[str]:
        node = self._node
        ips = {ip for ip, _ in node.host.tcp_listeners()}
        ips.update(self._reachability.external_ips())
        return ips

    def _targets(self, theirs: list[str]) -> list[tuple[str, int]]:
        own = self._own_ips()
        loopback, lan = scopes_of(own)
        return dial_targets(theirs, own - {"127.0.0.1", "::1"}, loopback, lan)

    def _refuse(self, peer_id: str, code: str) -> None:
        self.refused[code] += 1
        # A full global budget is no one peer's doing: one line for all of them.
        key = _GLOBAL if code == "busy" else peer_id
        self._node.complaints.log(
            log, key, "DCUtR session from %s refused: %s", peer_id[-8:], REFUSALS[code]
        )

    async def _dial_all(
        self, peer_id: str, targets: list[tuple[str, int]], as_responder: bool, timeout: float
    ) -> bool:
        node = self._node
        listen = node.host.tcp_listeners()
        if not listen:
            return False
        source = listen[0]
        allowance = DialAllowance(self._node.config.holepunch_max_connects)

        async def one(ip: str, port: int) -> None:
            # A router without a firewall answers a SYN that arrives before its
            # own host's SYN left with RST, which kills the dial and closes the
            # mapping: only SYNs that cross in flight get through.  So a refused
            # connect is repeated at once, at a random pace, until the window
            # ends (a router that drops such SYNs keeps the first connect
            # waiting until the peer's SYN opens the way).
            while allowance.take():
                self.connects += 1
                try:
                    stream = await _open_punch_socket(ip, port, source)
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                        await trio.sleep(random.uniform(0.0, REDIAL_JITTER_S))
                        continue
                    if exc.errno == errno.EADDRNOTAVAIL:  # a previous socket lingers
                        await trio.sleep(0.05)
                        continue
                    log.debug("hole-punch connect to %s:%d failed: %r", ip, port, exc)
                    return
                try:
                    await node.host.upgrade_punched(stream, peer_id, as_responder)
                except Exception as exc:  # handshake failed: not our peer, or it gave up
                    log.debug("hole-punch upgrade with %s:%d failed: %r", ip, port, exc)
                    await stream.aclose()
                return

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for ip, port in targets:
                    nursery.start_soon(one, ip, port)
                while "direct" not in node.connection_kinds(peer_id):
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        return "direct" in node.connection_kinds(peer_id)

    # ---------------------------------------------------------------- outcome

    def _mark_direct(self, state: PunchState) -> None:
        if state.state == "direct":
            return
        state.state = "direct"
        state.reason = ""
        if state.relayed_at is not None:
            state.upgrade_ms = (time.monotonic() - state.relayed_at) * 1000
        log.info(
            "connection to %s is direct now (hole punch, %s ms, %d attempt(s))",
            state.peer_id[-8:],
            "?" if state.upgrade_ms is None else f"{state.upgrade_ms:.0f}",
            state.attempts,
        )
        self._node.connection_upgraded(state.peer_id)

    def _mark_failed(self, state: PunchState) -> None:
        state.state = "failed"
        log.warning(
            "hole punch to %s failed after %d attempt(s) (%s): traffic stays on the relay",
            state.peer_id[-8:],
            state.attempts,
            state.reason,
        )


def _fmt(targets: list[tuple[str, int]]) -> str:
    return ", ".join(f"{ip}:{port}" for ip, port in targets[:4]) or "nothing"


def _encode(addrs: list[str]) -> list[bytes]:
    import multiaddr

    out = []
    for addr in addrs:
        try:
            out.append(multiaddr.Multiaddr(addr).to_bytes())
        except Exception:  # one of ours that multiaddr cannot encode: skip it
            continue
    return out


def _decode(raw: Any) -> list[str]:
    import multiaddr

    out = []
    for item in list(raw)[:MAX_ADDRS]:
        try:
            out.append(str(multiaddr.Multiaddr(bytes(item))))
        except Exception:  # malformed address from the peer
            continue
    return out


async def _open_punch_socket(ip: str, port: int, source: tuple[str, int]) -> Any:
    """One TCP connect to (ip, port) from our listening ``source`` (SO_REUSEPORT).

    Returns a ``trio.SocketStream``; raises ``OSError`` (refused, reset,
    unreachable).  A plain socket instead of a swarm dial: a hole punch may
    need hundreds of these per second (see holepunch.py), and py-libp2p's dial
    path costs milliseconds and an ERROR log line per refused attempt.
    """
    import socket as stdlib_socket

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


async def _read(stream: Any) -> Any:
    return await compat.read_dcutr(stream)


async def _write(stream: Any, message: Any) -> None:
    await compat.write_delimited(stream, message)


async def _close(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:  # already reset
        log.debug("closing DCUtR stream", exc_info=True)


__all__ = [
    "DCUTR_PROTOCOL",
    "DialAllowance",
    "HolePuncher",
    "PunchBudget",
    "PunchState",
    "is_public_ip",
]
