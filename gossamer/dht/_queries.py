"""How a DHT asks the network: adaptive-deadline calls, iterative lookups, stores.

The decisions (whom to ask next, when a lookup is done) are :mod:`._lookup`'s
and the deadlines :mod:`._rtt`'s; this module runs them: it fans queries out
in the DHT's nursery, feeds the answers back, and tells the routing table who
answered and who failed.  A store is itself a lookup, so it lives here too.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from gossamer.dht._lookup import Lookup
from gossamer.dht._records import Entry, decode_entry
from gossamer.dht._routing import key_id, peer_key
from gossamer.dht._service import DHTService, parse_contacts
from gossamer.dht.errors import DHTError, InvalidKey, InvalidRecord, StoreFailed
from gossamer.node import DeadlineExceeded, GossamerError, PeerUnreachable, RemoteError

if TYPE_CHECKING:
    from gossamer.dht._dht import DHT

log = logging.getLogger(__name__)


class Queries:
    """The outbound side of one :class:`~gossamer.dht.DHT`."""

    def __init__(self, dht: DHT) -> None:
        self._dht = dht
        self.node = dht.node
        self.config = dht.config
        self.peer_id = dht.peer_id
        self.clock = dht.clock
        self.table = dht.table
        self.rtt = dht.rtt
        self.store = dht.store
        self.validators = dht.validators

    def deadline(self, timeout: float | None) -> float:
        return trio.current_time() + (self.config.op_timeout if timeout is None else timeout)

    async def lookup(
        self,
        target: int,
        method: str,
        params: dict[str, Any],
        deadline: float,
        on_answer: Callable[[str, Any, Lookup], None] | None = None,
        *,
        alpha: int | None = None,
        width: int | None = None,
    ) -> Lookup:
        """Run one iterative lookup to completion, a stop, or the deadline.

        Queries run in the DHT's nursery: when the lookup is done, the ones
        still in flight finish in the background (each under its own deadline)
        instead of being cancelled, because a cancelled RPC resets its stream
        and the next call to that peer would pay for a new one.
        """
        nursery = self._dht._nursery_or_raise()
        width = width or self.config.k
        seeds = [(c.peer_id, c.addrs) for c in self.table.closest(target, width)]
        lookup = Lookup(
            target,
            seeds,
            k=width,
            alpha=alpha or self.config.alpha,
            self_peer_id=self.peer_id,
            stall_after=self.rtt.stall_after(),
        )
        send, receive = trio.open_memory_channel[tuple[str, bool, Any]](math.inf)
        with receive:
            while True:
                now = trio.current_time()
                for peer_id, addrs in lookup.next_queries(now):
                    nursery.start_soon(self._query, peer_id, addrs, method, params, deadline, send)
                if lookup.finished or lookup.in_flight() == 0 or now >= deadline:
                    break
                with trio.move_on_at(min(deadline, now + lookup.wake_in(now))):
                    answer = await receive.receive()
                    while True:
                        self._apply_answer(lookup, answer, on_answer)
                        try:
                            answer = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
        self.table.mark_refreshed(target, self.clock())
        return lookup

    def _apply_answer(
        self,
        lookup: Lookup,
        answer: tuple[str, bool, Any],
        on_answer: Callable[[str, Any, Lookup], None] | None,
    ) -> None:
        peer_id, ok, result = answer
        if not ok:
            lookup.on_failure(peer_id)
            if on_answer is not None and isinstance(result, RemoteError):
                on_answer(peer_id, result, lookup)
            return
        lookup.on_response(peer_id, parse_contacts(result.get("peers")))
        if on_answer is not None:
            on_answer(peer_id, result, lookup)

    async def _query(
        self,
        peer_id: str,
        addrs: tuple[str, ...],
        method: str,
        params: dict[str, Any],
        deadline: float,
        send: trio.MemorySendChannel[tuple[str, bool, Any]],
    ) -> None:
        result = await self.call(peer_id, addrs, method, params, deadline)
        ok = isinstance(result, dict)
        with contextlib.suppress(trio.BrokenResourceError):  # the lookup already ended
            send.send_nowait((peer_id, ok, result))

    async def call(
        self,
        peer_id: str,
        addrs: tuple[str, ...],
        method: str,
        params: dict[str, Any],
        deadline: float,
    ) -> Any:
        """One DHT call with an adaptive deadline; the routing table learns the outcome.

        Returns the result, or an exception instance (never raises a GossamerError).
        """
        connected = self.node.is_connected(peer_id)
        if not connected and addrs:
            self.node.peers.add_addrs(peer_id, list(addrs))
        remaining = deadline - trio.current_time()
        timeout = min(self.rtt.timeout(peer_id, connected), remaining)
        if timeout <= 0:
            return DeadlineExceeded("no time left")
        start = trio.current_time()
        try:
            result = await self.node.rpc.call(peer_id, DHTService, method, params, timeout=timeout)
        except PeerUnreachable as exc:
            # A refused dial is final; a connection that broke under a call is
            # not proof the peer is gone (it counts as one failure of two).
            self._failed(peer_id, definitive=not connected)
            return exc
        except RemoteError as exc:
            # It answered: alive, but it refused or choked on our request.
            self.table.update(peer_id, addrs, self.clock())
            return exc
        except GossamerError as exc:  # DeadlineExceeded, ProtocolError, ResponseTooLarge
            self._failed(peer_id, definitive=False)
            return exc
        elapsed = trio.current_time() - start
        if connected:
            self.rtt.observe(peer_id, elapsed)
        if not isinstance(result, dict):
            self._failed(peer_id, definitive=False)
            return DHTError("malformed answer")
        self._dht.learned(peer_id, addrs)
        return result

    def _failed(self, peer_id: str, definitive: bool) -> None:
        if self.table.record_failure(peer_id, definitive):
            self.rtt.forget(peer_id)
            log.debug("dht: evicted %s from the routing table", peer_id[-8:])

    def checked_entries(self, key: str, raw: Any, peer_id: str) -> list[Entry]:
        """Entries a peer returned that pass validation; the rest are dropped (and logged)."""
        if not isinstance(raw, list):
            return []
        now = self.clock()
        good = []
        for blob in raw[: self.config.limits.max_subkeys_per_key]:
            try:
                entry = decode_entry(blob)
                self.validators.validate(key, entry, now)
            except (InvalidRecord, InvalidKey) as exc:
                log.debug(
                    "dht: %s returned an invalid entry for %s: %s", peer_id[-8:], key[:80], exc
                )
                continue
            good.append(entry)
        return good

    # ---------------------------------------------------------------- storing

    async def store_entries(self, key: str, entries: list[Entry], deadline: float) -> int:
        """Store ``entries`` on the nodes nearest ``key``; how many stored them.

        The store *is* the lookup: every store answer also names the nodes the
        storer knows nearest the key, and the lookup goes on storing until the
        ``replicas`` nearest it knows of have all stored (or refused).  When our
        routing table already holds the nearest nodes, that is one round of
        parallel stores instead of a lookup followed by the stores.  Nodes that
        turn out not to be among the nearest keep a copy, as a path cache would.
        """
        target = key_id(key)
        replicas = min(self.config.replicas, self.config.k)
        # Are we ourselves among the nodes nearest the key (as far as we know)?
        known = self.table.closest(target, replicas)
        ourselves = len(known) < replicas or (
            peer_key(self.peer_id) ^ target < known[-1].id ^ target
        )
        blobs = [e.encode() for e in entries]
        reasons: list[str] = []
        stored = 0
        if ourselves:
            now = self.clock()
            try:
                for entry in entries:
                    self.store.put(key, entry, self.peer_id, now)
                stored += 1
            except InvalidRecord as exc:
                reasons.append(f"self: {exc}")

        def on_answer(peer_id: str, result: Any, lookup: Lookup) -> None:
            if isinstance(result, RemoteError):
                reasons.append(f"{peer_id[-8:]}: {result.code}: {result.message}")

        width = replicas - 1 if ourselves else replicas
        if width > 0:
            lookup = await self.lookup(
                target,
                "store",
                {"key": key, "entries": blobs},
                deadline,
                on_answer,
                alpha=width,
                width=width,
            )
            stored += lookup.answers
        if stored == 0:
            if trio.current_time() >= deadline:
                raise DeadlineExceeded(f"store of {key[:80]} did not finish before its deadline")
            raise StoreFailed(
                f"no node stored {key[:80]}" + (f": {reasons[0]}" if reasons else ""), reasons
            )
        return stored
