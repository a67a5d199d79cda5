"""The relay client of a private node: finding relays, keeping reservations, re-reserving.

While reachability is ``private`` the node keeps ``relay_reservations``
reservations on the best relays it knows: candidates come from ``relays``
and ``bootstrap`` in the config, from connected peers whose identify lists
the hop protocol, from the relays themselves (the ``relay.peers`` RPC:
"which other relays do you know"), and from the DHT.  Best = fewest recent
failures, then lowest round trip.  Every ``relay_check_interval`` seconds
each reserved relay is pinged; a relay that disconnects or stops answering
is dropped at once and replaced; a reservation is renewed before it expires.
Each reservation adds ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`` to
``node.addrs()`` and the node re-publishes its peer record in the DHT when
that list changes.

Not py-libp2p's ``CircuitV2Transport`` / ``RelayDiscovery``: the transport
reserves before every CONNECT and discovery runs every 300 s (LIBP2P-NOTES
pitfall 8).
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
from gossamer.node.errors import GossamerError
from gossamer.node.hooks import ContentRouting
from gossamer.node.reachability import PRIVATE, Reachability
from gossamer.node.relay_addrs import (
    MAX_RELAY_ADDRS,
    circuit_addr,
    decode_relay_addrs,
    ip_scope,
    substitute_unspecified,
    target_peer,
    tcp_addr,
    usable_relay_addr,
)
from gossamer.node.relay_wire import (
    HOP_PROTOCOL,
    RELAY_CONTENT_ID,
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

MAX_CANDIDATES = 64
RENEW_MARGIN = 0.25  # renew when this fraction of the ttl is left


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


class RelayClient:
    """Relay candidates and the reservations held with the best of them."""

    def __init__(self, node: Node, reachability: Reachability) -> None:
        self._node = node
        self._reachability = reachability
        self.reservations: dict[str, Reservation] = {}
        self.candidates: dict[str, Candidate] = {}
        self._discovered_at = -float("inf")
        self.events: list[str] = []  # recent changes, for status

    def add_configured(self) -> None:
        """The ``relays`` and ``bootstrap`` peers of the config become candidates."""
        config = self._node.config
        for addr in [*config.relays, *config.bootstrap]:
            self._add_candidate_addr(addr, "config" if addr in config.relays else "bootstrap")

    # ----------------------------------------------------------------- status

    def circuit_addrs(self) -> list[str]:
        """Our relayed addresses: one per address of each reserved relay."""
        me = self._node.peer_id
        out = []
        for reservation in self.reservations.values():
            for addr in reservation.relay_addrs:
                out.append(circuit_addr(addr, reservation.relay_id, me))
        return out

    def status(self) -> dict[str, Any]:
        return {
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

    def known(self, exclude: set[str]) -> list[Candidate]:
        """Candidates worth telling others about: with addresses and no recent failure."""
        self._refresh_identify_candidates()
        return [
            c
            for c in self.candidates.values()
            if c.peer_id not in exclude and c.addrs and c.failures == 0
        ]

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
            if node.host.supports(peer_id, HOP_PROTOCOL):
                remote = node.peer_remote(peer_id)
                addrs = []
                for addr in node.host.peerstore_addrs(peer_id):
                    addrs.append(substitute_unspecified(addr, remote))
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
        routing = node.service(ContentRouting)
        if routing is not None:
            try:
                providers = await routing.find_providers(RELAY_CONTENT_ID, timeout=5.0)
            except Exception as exc:  # DHT errors of any kind: discovery is best effort
                log.debug("dht relay lookup failed: %r", exc)
                providers = []
            for provider in providers:
                bare = [a.rpartition("/p2p/")[0] for a in provider.addrs]
                self._add_candidate(provider.peer_id, bare, "dht")

    # ----------------------------------------------------------- maintenance

    async def step(self) -> None:
        """One round: hold reservations while private, release them otherwise."""
        node = self._node
        config = node.config
        want = (
            self._reachability.status == PRIVATE
            and config.relay_client
            and config.relay_reservations > 0
        )
        if not want:
            for relay_id in list(self.reservations):
                self.drop(relay_id, "not private any more", failed=False)
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
                self.drop(relay_id, "relay disconnected")
                continue
            try:
                rtt = await node.ping(relay_id, timeout=min(5.0, node.config.relay_check_interval))
                reservation.rtt_ms = rtt
                candidate = self.candidates.get(relay_id)
                if candidate is not None:
                    candidate.rtt_ms = rtt
            except GossamerError:
                self.drop(relay_id, "relay stopped answering")
                await node.disconnect(relay_id)
                continue
            ttl = max(1.0, reservation.expires_at - reservation.reserved_at)
            if reservation.expires_at - time.time() < ttl * RENEW_MARGIN:
                try:
                    await self._reserve(relay_id)
                except (RelayError, GossamerError, OSError, EOFError, trio.TooSlowError) as exc:
                    self.drop(relay_id, f"renewal failed: {exc}")

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
            except (RelayError, GossamerError, OSError, EOFError, trio.TooSlowError) as exc:
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
        pb = compat.circuit_pb()
        node = self._node
        start = time.perf_counter()
        stream = await node.host.new_stream(relay_id, HOP_PROTOCOL)
        try:
            await write_msg(stream, pb.HopMessage(type=pb.HopMessage.RESERVE))
            answer = await read_msg(stream, pb.HopMessage)
        except BaseException:
            await reset_quietly(stream)
            raise
        await stream.close()
        rtt = (time.perf_counter() - start) * 1000
        if answer.type != pb.HopMessage.STATUS or answer.status != StatusCode.OK:
            raise RelayError(f"relay {relay_id[-8:]} refused: {status_name(answer.status)}")
        remote = node.peer_remote(relay_id)
        scope = ip_scope(remote[0]) if remote else "public"
        candidate = self.candidates.get(relay_id)
        offered = decode_relay_addrs(answer.reservation.addrs, relay_id)
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

    def drop(self, relay_id: str, why: str, failed: bool = True) -> None:
        """Forget the reservation with ``relay_id``; a failed relay is retried later."""
        if self.reservations.pop(relay_id, None) is not None:
            self._event(f"{'lost' if failed else 'released'} relay {relay_id[-8:]}: {why}")
            candidate = self.candidates.get(relay_id)
            if candidate is not None and failed:
                candidate.failures += 1
                candidate.retry_at = time.monotonic() + backoff(candidate.failures)
            self._node.addresses_changed()
