"""The DHT attached to a running node: the trio code around the pure cores.

``dht = await DHT.start(node)`` (or ``async with DHT(node) as dht``) registers
the ``dht`` RPC service, hooks the node's connection events, loads what was
persisted, starts the background loops in the node's nursery and sets
``node.dht = dht``.  Everything that decides something lives in the pure
modules (:mod:`._records`, :mod:`._routing`, :mod:`._lookup`, :mod:`._store`,
:mod:`._rtt`); this module moves messages, applies deadlines and keeps time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from gossamer.dht._lookup import Lookup
from gossamer.dht._records import (
    Entry,
    Record,
    Validator,
    Validators,
    check_key,
    decode_entry,
    make_entry,
    merge,
    to_record,
)
from gossamer.dht._routing import Contact, RoutingTable, key_id, peer_key
from gossamer.dht._rtt import RttEstimator
from gossamer.dht._service import DHTService, clean_addrs, parse_contacts
from gossamer.dht._store import RecordStore, StoreLimits
from gossamer.dht.errors import DHTError, InvalidKey, InvalidRecord, StoreFailed
from gossamer.node.errors import (
    DeadlineExceeded,
    GossamerError,
    PeerUnreachable,
    RemoteError,
)

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger("gossamer.dht")

PROVIDERS_KIND = "providers"
PEER_KIND = "peer"


@dataclass
class DHTConfig:
    """Tunables of the DHT.  Defaults suit a swarm on the internet; tests shrink the intervals."""

    k: int = 20  # bucket size and lookup width
    replicas: int = 20  # how many of the nodes nearest a key store it (at most k)
    alpha: int = 3  # queries in flight per lookup
    get_quorum: int = 3  # get(latest=True) stops once this many replicas answered
    op_timeout: float = 10.0  # default deadline of put/get/provide/find_*
    # Per-call deadline: srtt + 4·rttvar, clamped.  The floor is TCP's minimum
    # RTO (RFC 6298): latency comes from the lookup's stall rule, the deadline
    # only decides that a peer failed, and a loaded machine must not make us
    # evict peers that are merely slow for a moment.
    rpc_timeout_floor: float = 1.0
    rpc_timeout_cap: float = 5.0
    dial_allowance: float = 2.0  # added to a call's deadline when we must dial first
    stall_floor: float = 0.02  # a lookup asks another peer after max(this, srtt + 4·rttvar)
    refresh_interval: float = 600.0  # buckets not looked up this long get a refresh lookup
    republish_interval: float = 600.0  # we re-store our own records this often
    purge_interval: float = 30.0
    flush_interval: float = 0.5  # persistence batching
    provider_ttl: float = 3600.0
    peer_record_ttl: float = 3600.0
    publish_peer_record: bool = True  # keep /gossamer/peer/<our id> -> our addrs in the DHT
    bootstrap_on_join: bool = True  # look ourselves up once the first peer answers
    refresh_buckets_on_join: bool = True
    reconcile_interval: float = 5.0  # greet connected peers missing from the table
    persist: bool = True
    reconnect_saved_contacts: int = 8
    limits: StoreLimits = field(default_factory=StoreLimits)


@dataclass(frozen=True)
class Provider:
    peer_id: str
    addrs: tuple[str, ...]
    expires_at: float


class DHT:
    """Kademlia over the node's RPC: signed, expiring, sub-keyed records and providers."""

    def __init__(self, node: Node, config: DHTConfig | None = None) -> None:
        self.node = node
        self.config = config or DHTConfig()
        self.peer_id = node.peer_id
        self.validators = Validators()
        self.table = RoutingTable(node.peer_id, k=self.config.k)
        self.store = RecordStore(node.peer_id, self.config.limits)
        self.rtt = RttEstimator(
            floor=self.config.rpc_timeout_floor,
            cap=self.config.rpc_timeout_cap,
            dial_allowance=self.config.dial_allowance,
            stall_floor=self.config.stall_floor,
        )
        self._signer = _Signer(node.peer_id, node.identity.private_key)
        self._own: dict[tuple[str, str], Entry] = {}  # what we published, by (key, sub-key)
        self._own_by_key: dict[str, dict[str, Entry]] = {}
        self._own_dirty: set[tuple[str, str]] = set()
        self._providing: dict[str, float] = {}  # content id -> ttl, re-provided on republish
        self._persist: Any = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._joined = trio.Event()
        self.bootstrapped = trio.Event()  # set once the join lookups are done
        self._hello_pending: set[str] = set()
        self._hello_recent: dict[str, float] = {}
        self._closed = False
        self._started = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def start(cls, node: Node, config: DHTConfig | None = None) -> DHT:
        dht = cls(node, config)
        await dht._start()
        return dht

    async def __aenter__(self) -> DHT:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _start(self) -> None:
        if self._started:
            raise DHTError("this DHT is already started")
        self._started = True
        node = self.node
        if self.config.persist:
            self._load()
        self._scope = await node.nursery.start(self._run)
        node.register(DHTService(self))
        node.add_connection_listener(self._on_connection)
        node.on_close(self.aclose)
        self._register_control()
        node.dht = self  # type: ignore[attr-defined]  # the documented attachment point
        for peer_id in node.connected_peers():
            self._schedule_hello(peer_id)
        if self._persist is not None and self.config.reconnect_saved_contacts:
            self._nursery_or_raise().start_soon(self._reconnect_saved)
        log.info(
            "dht started on %s (%d records, %d own)",
            self.peer_id[-8:],
            len(self.store),
            len(self._own),
        )

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._maintenance_loop)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._republish_loop)
                nursery.start_soon(self._reconcile_loop)
                task_status.started(scope)

    async def aclose(self) -> None:
        """Stop the background work and flush to disk (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        if self._persist is not None:
            try:
                self._flush(contacts=True)
            except Exception:
                log.warning("dht: final flush failed", exc_info=True)
            self._persist.close()
            self._persist = None

    def _nursery_or_raise(self) -> trio.Nursery:
        if self._nursery is None or self._closed:
            raise DHTError("the DHT is not running")
        return self._nursery

    def _own_set(self, slot: tuple[str, str], entry: Entry) -> None:
        self._own[slot] = entry
        self._own_by_key.setdefault(slot[0], {})[slot[1]] = entry
        self._own_dirty.add(slot)

    def _own_del(self, slot: tuple[str, str]) -> None:
        if self._own.pop(slot, None) is None:
            return
        subs = self._own_by_key[slot[0]]
        del subs[slot[1]]
        if not subs:
            del self._own_by_key[slot[0]]
        self._own_dirty.add(slot)

    def _validate(self, key: str, entry: Entry, now: float) -> None:
        self.validators.validate(key, entry, now)

    def register_validator(self, kind: str, validator: Validator | Callable[..., None]) -> None:
        """Add a check for records under ``/gossamer/<kind>/``.

        It runs on this node for what it stores, returns and publishes; every node
        that should enforce it must register it too.
        """
        self.validators.register(kind, validator)

    # ------------------------------------------------------------- public API

    async def put(
        self,
        key: str,
        value: Any,
        expires_at: float,
        subkey: str | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        """Store ``value`` (anything msgpack can encode) under ``key`` (or its
        ``subkey``) on the k nodes nearest the key, until ``expires_at`` (unix
        time).  The record is signed with this node's key and republished by
        this node until it expires.  Returns how many nodes stored it.

        Raises InvalidKey / InvalidRecord / RecordTooLarge before sending
        anything if the record is not acceptable, StoreFailed if no node
        stored it, DeadlineExceeded if the deadline passed first.
        """
        subkey = subkey or ""
        slot = (key, subkey)
        previous = self._own.get(slot)  # a rewrite within one clock tick still wins
        ts = max(time.time(), previous.ts + 1e-6 if previous else 0.0)
        entry = make_entry(
            key, value, ts=ts, expires_at=expires_at, subkey=subkey, identity=self._signer
        )
        self.validators.trust(key, entry)  # we just signed it: no need to verify
        self._validate(key, entry, time.time())
        self._own_set(slot, entry)
        return await self._store_entries(key, [entry], self._deadline(timeout))

    async def get(
        self, key: str, latest: bool = True, *, timeout: float | None = None
    ) -> Record | None:
        """What the DHT holds under ``key``, or None.

        ``latest=True`` merges the answers of ``get_quorum`` replicas (newest
        version per sub-key); ``latest=False`` returns the first valid answer.
        Expired, unsigned-but-owned and mis-signed entries are never returned.
        """
        check_key(key)
        now = time.time()
        local = list(self.store.get(key, now).values())
        local += [e for e in self._own_by_key.get(key, {}).values() if e.expires_at > now]
        if local and not latest:
            return to_record(key, merge(local, now))
        found: list[Entry] = list(local)
        holders = 1 if local else 0
        quorum = self.config.get_quorum if latest else 1

        def on_answer(peer_id: str, result: Any, lookup: Lookup) -> None:
            nonlocal holders
            good = self._checked_entries(key, result.get("entries"), peer_id)
            if good:
                found.extend(good)
                holders += 1
                if holders >= quorum:
                    lookup.stop()
                # Keep only as many queries in flight as answers are still needed.
                lookup.alpha = min(self.config.alpha, quorum - holders) or 1

        deadline = self._deadline(timeout)
        lookup = await self._lookup(
            key_id(key),
            "find_value",
            {"key": key},
            deadline,
            on_answer,
            alpha=min(self.config.alpha, max(1, quorum - holders)),
        )
        merged = merge(found, time.time())
        if not merged and not lookup.finished and trio.current_time() >= deadline:
            raise DeadlineExceeded(f"get {key[:80]} found nothing before its deadline")
        return to_record(key, merged)

    async def provide(
        self, content_id: str, ttl: float | None = None, *, timeout: float | None = None
    ) -> int:
        """Announce that this node serves ``content_id`` (e.g. a content hash).

        The provider record is re-announced on every republish until
        :meth:`stop_providing`.  Returns how many nodes stored it.
        """
        ttl = self.config.provider_ttl if ttl is None else ttl
        key = provider_key(content_id)
        self._providing[content_id] = ttl
        return await self.put(
            key,
            {"addrs": list(self.own_addrs())},
            time.time() + ttl,
            subkey=self.peer_id,
            timeout=timeout,
        )

    def stop_providing(self, content_id: str) -> None:
        """Stop re-announcing ``content_id`` (the record expires on its own)."""
        self._providing.pop(content_id, None)
        slot = (provider_key(content_id), self.peer_id)
        self._own_del(slot)

    async def find_providers(
        self, content_id: str, *, timeout: float | None = None
    ) -> list[Provider]:
        """Peers that announced ``content_id``, one per peer, newest announcement first."""
        record = await self.get(provider_key(content_id), latest=True, timeout=timeout)
        if record is None:
            return []
        providers = []
        for peer_id, item in record.subkeys.items():
            value = item.value if isinstance(item.value, dict) else {}
            addrs = clean_addrs(peer_id, value.get("addrs"))
            if addrs and peer_id != self.peer_id:
                self.node.peers.add_addrs(peer_id, list(addrs))
            providers.append(Provider(peer_id, addrs, item.expires_at))
        providers.sort(key=lambda p: -p.expires_at)
        return providers

    async def find_peer(self, peer_id: str, *, timeout: float | None = None) -> list[str] | None:
        """Addresses of ``peer_id``, or None if the DHT does not know it.

        A lookup towards the peer's id: the nodes nearest it know it, and the
        peer itself is the nearest candidate, so the lookup reaches it (trying
        every address anyone reported) and we return the addresses it states
        itself.  A peer that cannot be reached directly falls back to its own
        signed record ``/gossamer/peer/<peer_id>`` (unverified addresses, e.g.
        relayed ones).  Found addresses go into the node's peer table, so
        ``node.ensure_connected(peer_id)`` can dial them.
        """
        if peer_id == self.peer_id:
            return list(self.own_addrs())
        contact = self.table.get(peer_id)
        if contact is not None and contact.addrs and self.node.is_connected(peer_id):
            return list(contact.addrs)
        deadline = self._deadline(timeout)
        reached = False

        def on_answer(responder: str, result: Any, lookup: Lookup) -> None:
            nonlocal reached
            if responder == peer_id:
                reached = True
                lookup.stop()

        target = peer_key(peer_id)
        await self._lookup(
            target, "find_node", {"target": _target_bytes(target)}, deadline, on_answer
        )
        addrs: list[str] = []
        if reached:
            result = await self._call(peer_id, (), "hello", {"addrs": self.hello_addrs()}, deadline)
            if isinstance(result, dict):
                self.on_hello(peer_id, result.get("addrs"))
                contact = self.table.get(peer_id)
                addrs = list(contact.addrs) if contact is not None else []
        if not addrs and trio.current_time() < deadline:
            record = await self.get(
                peer_record_key(peer_id),
                latest=True,
                timeout=max(0.01, deadline - trio.current_time()),
            )
            if record is not None and isinstance(record.value, dict):
                addrs = list(clean_addrs(peer_id, record.value.get("addrs")))
        if not addrs:
            return None
        self.node.peers.add_addrs(peer_id, addrs)
        return addrs

    def own_addrs(self) -> tuple[str, ...]:
        """Our dialable addresses as we publish them (unspecified hosts left out)."""
        return clean_addrs(self.peer_id, self.node.addrs())

    def hello_addrs(self) -> list[str]:
        # Unspecified hosts (0.0.0.0) included: the peer substitutes the IP it sees us at.
        return self.node.addrs()[:8]

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "routing_table": len(self.table),
            "buckets": self.table.bucket_sizes(),
            "records": len(self.store),
            "record_bytes": self.store.total_bytes,
            "own_records": len(self._own),
            "providing": sorted(self._providing),
            "srtt_ms": None if self.rtt.srtt() is None else round(self.rtt.srtt() * 1000, 3),
        }

    # -------------------------------------------------------- the lookup driver

    def _deadline(self, timeout: float | None) -> float:
        return trio.current_time() + (self.config.op_timeout if timeout is None else timeout)

    async def _lookup(
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
        nursery = self._nursery_or_raise()
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
        self.table.mark_refreshed(target, time.time())
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
        result = await self._call(peer_id, addrs, method, params, deadline)
        ok = isinstance(result, dict)
        with contextlib.suppress(trio.BrokenResourceError):  # the lookup already ended
            send.send_nowait((peer_id, ok, result))

    async def _call(
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
            self.table.update(peer_id, addrs, time.time())
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
        if self.table.update(peer_id, addrs, time.time()) and len(self.table) == 1:
            self._joined.set()
        return result

    def _failed(self, peer_id: str, definitive: bool) -> None:
        if self.table.record_failure(peer_id, definitive):
            self.rtt.forget(peer_id)
            log.debug("dht: evicted %s from the routing table", peer_id[-8:])

    def _checked_entries(self, key: str, raw: Any, peer_id: str) -> list[Entry]:
        """Entries a peer returned that pass validation; the rest are dropped (and logged)."""
        if not isinstance(raw, list):
            return []
        now = time.time()
        good = []
        for blob in raw[: self.config.limits.max_subkeys_per_key]:
            try:
                entry = decode_entry(blob)
                self._validate(key, entry, now)
            except (InvalidRecord, InvalidKey) as exc:
                log.debug(
                    "dht: %s returned an invalid entry for %s: %s", peer_id[-8:], key[:80], exc
                )
                continue
            good.append(entry)
        return good

    # ---------------------------------------------------------------- storing

    async def _store_entries(self, key: str, entries: list[Entry], deadline: float) -> int:
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
            now = time.time()
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
            lookup = await self._lookup(
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

    # -------------------------------------------------------- serving (RPC side)

    def serve_find_value(self, key: str, caller: str) -> tuple[list[Entry], list[Contact]]:
        now = time.time()
        entries = list(self.store.get(key, now).values())
        return entries, self.table.closest(key_id(key), exclude=caller)

    def serve_store(self, key: str, entries: list[Entry], caller: str) -> list[Contact]:
        """Validate and keep ``entries``; the contacts we know nearest ``key``."""
        now = time.time()
        for entry in entries:
            self._validate(key, entry, now)
        for entry in entries:
            self.store.put(key, entry, caller, now)
        return self.table.closest(key_id(key), exclude=caller)

    def note_caller(self, peer_id: str) -> None:
        """An RPC from ``peer_id``: it is alive; learn its addresses if it is new."""
        contact = self.table.get(peer_id)
        if contact is not None:
            self.table.update(peer_id, (), time.time())
        else:
            self._schedule_hello(peer_id)

    def on_hello(self, peer_id: str, raw_addrs: Any) -> None:
        info = self.node.peers.get(peer_id)
        addrs = clean_addrs(peer_id, raw_addrs, info.remote_addr if info else "")
        if addrs:
            self.node.peers.add_addrs(peer_id, list(addrs))
        if self.table.update(peer_id, addrs, time.time()) and len(self.table) == 1:
            self._joined.set()

    # -------------------------------------------------------- routing upkeep

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if not connected or self._closed:
            return
        info = self.node.peers.get(peer_id)
        # The dialer says hello; the answering side learns the dialer from it.
        if info is None or info.direction != "inbound":
            self._schedule_hello(peer_id)

    def _schedule_hello(self, peer_id: str) -> None:
        if self._closed or self._nursery is None or peer_id in self._hello_pending:
            return
        now = trio.current_time()
        if now - self._hello_recent.get(peer_id, -math.inf) < 2.0:
            return
        if len(self._hello_recent) > 4096:
            self._hello_recent = {p: t for p, t in self._hello_recent.items() if now - t < 2.0}
        self._hello_recent[peer_id] = now
        self._hello_pending.add(peer_id)
        self._nursery.start_soon(self._hello, peer_id)

    async def _hello(self, peer_id: str, attempts: int = 3) -> None:
        """Swap addresses with ``peer_id``; retried while we stay connected to it."""
        try:
            delay = 0.2
            for attempt in range(attempts):
                result = await self._call(
                    peer_id,
                    (),
                    "hello",
                    {"addrs": self.hello_addrs()},
                    trio.current_time() + self.config.rpc_timeout_cap + self.config.dial_allowance,
                )
                if isinstance(result, dict):
                    self.on_hello(peer_id, result.get("addrs"))
                    return
                if isinstance(result, RemoteError) or attempt == attempts - 1:
                    return  # it answered "no": not a DHT peer (or an incompatible one)
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay *= 2
                if not self.node.is_connected(peer_id):
                    return
        finally:
            self._hello_pending.discard(peer_id)

    async def _reconcile_loop(self) -> None:
        """Greet connected peers that are not in the routing table (a hello that
        failed under load, a peer whose DHT started after we connected); with an
        empty table, also peers we know addresses of (rejoin after an outage)."""
        while True:
            await self._sleep_jittered(self.config.reconcile_interval)
            connected = self.node.connected_peers()
            for peer_id in connected:
                if peer_id not in self.table:
                    self._schedule_hello(peer_id)
            if not len(self.table):
                known = [p.peer_id for p in self.node.peers.all() if p.addrs]
                for peer_id in random.sample(known, min(8, len(known))):
                    self._schedule_hello(peer_id)

    @staticmethod
    async def _sleep_jittered(seconds: float) -> None:
        await trio.sleep(seconds * random.uniform(0.8, 1.2))

    async def _reconnect_saved(self) -> None:
        """After a restart, greet a few peers we knew (rejoin without a bootstrap list)."""
        if self._persist is None:
            return
        rows = self._persist.contacts(self.config.reconnect_saved_contacts)
        async with trio.open_nursery() as nursery:
            for peer_id, blob, _ in rows:
                try:
                    from gossamer.node import wire

                    addrs = clean_addrs(peer_id, wire.unpack(blob))
                except GossamerError:
                    continue
                if addrs and not self.node.is_connected(peer_id):
                    self.node.peers.add_addrs(peer_id, list(addrs))
                    nursery.start_soon(self._hello, peer_id)

    async def _refresh_loop(self) -> None:
        """Join once someone answers; refresh stale buckets; join afresh after an
        outage that emptied the routing table."""
        while True:
            await self._joined.wait()
            if self.config.bootstrap_on_join:
                await self._bootstrap()
            self.bootstrapped.set()
            period = self.config.refresh_interval / 4
            next_refresh = trio.current_time() + period
            while len(self.table):
                await self._sleep_jittered(min(self.config.reconcile_interval, period))
                if trio.current_time() < next_refresh:
                    continue
                next_refresh = trio.current_time() + period
                for index in self.table.stale_buckets(time.time(), self.config.refresh_interval):
                    await self._quiet_lookup(self.table.random_id_in_bucket(index))
            self._joined = trio.Event()
            if len(self.table):  # someone answered while we swapped events
                self._joined.set()

    async def _bootstrap(self) -> None:
        """Join: a lookup of our own id (finds our neighbours and tells them about us),
        then one lookup per farther, still empty bucket so every distance range has
        a contact."""
        await self._quiet_lookup(peer_key(self.peer_id))
        if self.config.refresh_buckets_on_join:
            # Only the distance ranges where we know nobody: the own-id lookup
            # already filled the near buckets and passed through far ones, and
            # the periodic refresh tops up the rest.  (A lookup per bucket
            # made a join cost ~150 RPCs in a 30-node swarm.)
            sizes = self.table.bucket_sizes()
            for index in self.table.stale_buckets(time.time(), self.config.refresh_interval):
                if not sizes.get(index):
                    await self._quiet_lookup(self.table.random_id_in_bucket(index))
        if self.config.publish_peer_record:
            await self._publish_peer_record()
        self.bootstrapped.set()

    async def _quiet_lookup(self, target: int) -> None:
        try:
            await self._lookup(
                target,
                "find_node",
                {"target": _target_bytes(target)},
                self._deadline(None),
            )
        except GossamerError as exc:
            log.debug("dht: refresh lookup failed: %s", exc)

    async def _publish_peer_record(self) -> None:
        addrs = self.own_addrs()
        if not addrs:
            return
        try:
            await self.put(
                peer_record_key(self.peer_id),
                {"addrs": list(addrs)},
                time.time() + self.config.peer_record_ttl,
            )
        except GossamerError as exc:
            log.info("dht: publishing our peer record failed: %s", exc)

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(self.config.republish_interval * random.uniform(0.9, 1.1))
            await self.republish()

    async def republish(self) -> None:
        """Re-store our own unexpired records; refresh our provider and peer records."""
        now = time.time()
        for content_id, ttl in list(self._providing.items()):
            try:
                await self.provide(content_id, ttl)
            except GossamerError as exc:
                log.info("dht: re-providing %s failed: %s", content_id[:40], exc)
        if self.config.publish_peer_record and len(self.table):
            await self._publish_peer_record()
        refreshed = {provider_key(c) for c in self._providing} | {peer_record_key(self.peer_id)}
        by_key: dict[str, list[Entry]] = {}
        for (key, _), entry in list(self._own.items()):
            if entry.expires_at > now and key not in refreshed:
                by_key.setdefault(key, []).append(entry)
        for key, entries in by_key.items():
            try:
                await self._store_entries(key, entries, self._deadline(None))
            except GossamerError as exc:
                log.info("dht: republishing %s failed: %s", key[:80], exc)

    async def _maintenance_loop(self) -> None:
        last_purge = trio.current_time()
        while True:
            await trio.sleep(
                self.config.flush_interval if self._persist else self.config.purge_interval
            )
            now = trio.current_time()
            if now - last_purge >= self.config.purge_interval:
                last_purge = now
                wall = time.time()
                self.store.purge(wall)
                for slot, entry in list(self._own.items()):
                    if entry.expires_at <= wall:
                        self._own_del(slot)
            if self._persist is not None:
                try:
                    self._flush(contacts=now - last_purge < self.config.flush_interval)
                except Exception:
                    log.warning("dht: flushing to disk failed", exc_info=True)

    # ----------------------------------------------------------- persistence

    def _load(self) -> None:
        from gossamer.dht._persist import Persistence

        self._persist = Persistence(self.node.config.data_dir)
        now = time.time()
        dropped = 0
        for key, blob, origin in self._persist.records(now):
            try:
                entry = decode_entry(blob)
                self._validate(key, entry, now)
                self.store.put(key, entry, origin, now)
            except (DHTError, ValueError):
                dropped += 1
        for key, blob in self._persist.own(now):
            try:
                entry = decode_entry(blob)
                self._validate(key, entry, now)
            except (DHTError, ValueError):
                dropped += 1
                continue
            self._own_set((key, entry.subkey), entry)
            if key.startswith(f"/gossamer/{PROVIDERS_KIND}/") and entry.subkey == self.peer_id:
                content_id = key[len(f"/gossamer/{PROVIDERS_KIND}/") :]
                self._providing[content_id] = self.config.provider_ttl
        self.store.dirty.clear()
        self._own_dirty.clear()
        if dropped:
            log.warning("dht: dropped %d invalid persisted records", dropped)

    def _flush(self, contacts: bool = False) -> None:
        from gossamer.node import wire

        persist = self._persist
        if persist is None:
            return
        records = []
        for key, subkey in self.store.dirty:
            held = self.store.stored(key, subkey)
            if held is None:
                records.append((key, subkey, None, "", 0.0))
            else:
                entry, origin = held
                records.append((key, subkey, entry.encode(), origin, entry.expires_at))
        own = []
        for slot in self._own_dirty:
            entry = self._own.get(slot)
            own.append(
                (*slot, None, 0.0) if entry is None else (*slot, entry.encode(), entry.expires_at)
            )
        contact_rows = None
        if contacts:
            contact_rows = [
                (c.peer_id, wire.pack(list(c.addrs)), c.last_seen)
                for c in self.table.peers()
                if c.addrs
            ]
        if not records and not own and contact_rows is None:
            return
        persist.write(records, own, contact_rows, now=time.time())
        self.store.dirty.clear()
        self._own_dirty.clear()

    # ------------------------------------------------------------ control API

    def _register_control(self) -> None:
        async def put(params: dict[str, Any]) -> Any:
            key, value = params.get("key"), params.get("value")
            ttl = params.get("ttl", 3600.0)
            subkey = params.get("subkey")
            if not isinstance(key, str) or not isinstance(ttl, int | float) or ttl <= 0:
                raise DHTError("dht.put needs 'key' (string), 'value' and a positive 'ttl'")
            if subkey is not None and not isinstance(subkey, str):
                raise DHTError("dht.put: 'subkey' must be a string")
            stored = await self.put(key, value, time.time() + float(ttl), subkey=subkey)
            return {"key": key, "stored": stored}

        async def get(params: dict[str, Any]) -> Any:
            key = params.get("key")
            if not isinstance(key, str):
                raise DHTError("dht.get needs 'key' (string)")
            record = await self.get(key, latest=bool(params.get("latest", True)))
            return None if record is None else record.to_dict()

        async def providers(params: dict[str, Any]) -> Any:
            content_id = params.get("content_id")
            if not isinstance(content_id, str):
                raise DHTError("dht.providers needs 'content_id' (string)")
            found = await self.find_providers(content_id)
            return [
                {"peer_id": p.peer_id, "addrs": list(p.addrs), "expires_at": p.expires_at}
                for p in found
            ]

        async def provide(params: dict[str, Any]) -> Any:
            content_id = params.get("content_id")
            if not isinstance(content_id, str):
                raise DHTError("dht.provide needs 'content_id' (string)")
            return {"content_id": content_id, "stored": await self.provide(content_id)}

        async def find_peer(params: dict[str, Any]) -> Any:
            peer_id = params.get("peer_id")
            if not isinstance(peer_id, str):
                raise DHTError("dht.find_peer needs 'peer_id' (string)")
            return {"peer_id": peer_id, "addrs": await self.find_peer(peer_id)}

        async def status(params: dict[str, Any]) -> Any:
            return self.status()

        for name, handler in (
            ("dht.put", put),
            ("dht.get", get),
            ("dht.providers", providers),
            ("dht.provide", provide),
            ("dht.find_peer", find_peer),
            ("dht.status", status),
        ):
            if name not in self.node.control_methods:
                self.node.register_control(name, handler)


async def attach(node: Node) -> None:
    """Daemon extension (``gossamer.dht:attach``): a DHT with default settings on ``node``."""
    await DHT.start(node)


@dataclass(frozen=True)
class _Signer:
    """The node key, loaded once (Identity.sign rebuilds it from the seed each call)."""

    peer_id: str
    private_key: Any

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def provider_key(content_id: str) -> str:
    if not isinstance(content_id, str) or not content_id or "/" in content_id:
        raise InvalidKey("a content id is a non-empty string without '/'")
    return f"/gossamer/{PROVIDERS_KIND}/{content_id}"


def peer_record_key(peer_id: str) -> str:
    return f"/gossamer/{PEER_KIND}/{peer_id}"


def _target_bytes(target: int) -> bytes:
    return target.to_bytes(32, "big")
