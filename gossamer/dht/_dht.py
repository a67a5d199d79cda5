"""The DHT attached to a running node: its state, its public API, its lifecycle.

``dht = await DHT.start(node)`` (or ``async with DHT(node) as dht``) registers
the ``dht`` RPC service, hooks the node's connection events, loads what was
persisted, starts the background loops in the node's nursery and attaches
itself to the node (``node.service(DHT)``; the node's own behaviours see it as
:class:`gossamer.node.hooks.ContentRouting`).  Everything that decides something lives in the pure
modules (:mod:`._records`, :mod:`._routing`, :mod:`._lookup`, :mod:`._store`,
:mod:`._rtt`); the trio code around them is split by direction: outbound
calls and lookups in :mod:`._queries`, inbound RPCs in :mod:`._service`,
background loops in :mod:`._upkeep`, the control API in :mod:`._control`.
This module holds the state they share and the records we published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from gossamer.dht._config import DHTConfig
from gossamer.dht._control import register_control
from gossamer.dht._lookup import Lookup
from gossamer.dht._queries import Queries
from gossamer.dht._records import (
    PROVIDERS_KIND,
    Entry,
    Record,
    Validator,
    Validators,
    check_key,
    decode_entry,
    make_entry,
    merge,
    peer_record_key,
    provider_key,
    to_record,
)
from gossamer.dht._routing import Contact, RoutingTable, key_id, peer_key, target_bytes
from gossamer.dht._rtt import RttEstimator
from gossamer.dht._service import DHTService, clean_addrs
from gossamer.dht._store import RecordStore
from gossamer.dht._upkeep import Upkeep
from gossamer.dht.errors import DHTError
from gossamer.node import DeadlineExceeded, GossamerError, Provider

if TYPE_CHECKING:
    from gossamer.node import Node

log = logging.getLogger(__name__)


class DHT:
    """Kademlia over the node's RPC: signed, expiring, sub-keyed records and providers."""

    def __init__(
        self,
        node: Node,
        config: DHTConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.config = config or DHTConfig()
        # Unix time for everything a record carries or is checked against (timestamps,
        # expiry, contacts' last_seen); tests inject a fake one.  Deadlines and timers
        # stay on trio's clock, which has its own MockClock.
        self.clock = clock
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
        self._closed = False
        self._started = False
        self.queries = Queries(self)
        self.upkeep = Upkeep(self)

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def start(
        cls,
        node: Node,
        config: DHTConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> DHT:
        dht = cls(node, config, clock=clock)
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
        node.add_connection_listener(self.upkeep.on_connection)
        node.on_close(self.aclose)
        register_control(self)
        node.attach(self)
        node.add_addresses_listener(self._on_addresses_changed)
        for peer_id in node.connected_peers():
            self.upkeep.schedule_hello(peer_id)
        if self._persist is not None and self.config.reconnect_saved_contacts:
            self._nursery_or_raise().start_soon(self.upkeep.reconnect_saved)
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
                nursery.start_soon(self.upkeep.maintenance_loop)
                nursery.start_soon(self.upkeep.refresh_loop)
                nursery.start_soon(self.upkeep.republish_loop)
                nursery.start_soon(self.upkeep.reconcile_loop)
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
        ts = max(self.clock(), previous.ts + 1e-6 if previous else 0.0)
        entry = make_entry(
            key, value, ts=ts, expires_at=expires_at, subkey=subkey, identity=self._signer
        )
        self.validators.trust(key, entry)  # we just signed it: no need to verify
        self._validate(key, entry, self.clock())
        self._own_set(slot, entry)
        return await self.queries.store_entries(key, [entry], self.queries.deadline(timeout))

    async def get(
        self, key: str, latest: bool = True, *, timeout: float | None = None
    ) -> Record | None:
        """What the DHT holds under ``key``, or None.

        ``latest=True`` merges the answers of ``get_quorum`` replicas (newest
        version per sub-key); ``latest=False`` returns the first valid answer.
        Expired, unsigned-but-owned and mis-signed entries are never returned.
        """
        check_key(key)
        now = self.clock()
        local = list(self.store.get(key, now).values())
        local += [e for e in self._own_by_key.get(key, {}).values() if e.expires_at > now]
        if local and not latest:
            return to_record(key, merge(local, now))
        found: list[Entry] = list(local)
        holders = 1 if local else 0
        quorum = self.config.get_quorum if latest else 1

        def on_answer(peer_id: str, result: Any, lookup: Lookup) -> None:
            nonlocal holders
            good = self.queries.checked_entries(key, result.get("entries"), peer_id)
            if good:
                found.extend(good)
                holders += 1
                if holders >= quorum:
                    lookup.stop()
                # Keep only as many queries in flight as answers are still needed.
                lookup.alpha = min(self.config.alpha, quorum - holders) or 1

        deadline = self.queries.deadline(timeout)
        lookup = await self.queries.lookup(
            key_id(key),
            "find_value",
            {"key": key},
            deadline,
            on_answer,
            alpha=min(self.config.alpha, max(1, quorum - holders)),
        )
        merged = merge(found, self.clock())
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
            self.clock() + ttl,
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
        deadline = self.queries.deadline(timeout)
        reached = False

        def on_answer(responder: str, result: Any, lookup: Lookup) -> None:
            nonlocal reached
            if responder == peer_id:
                reached = True
                lookup.stop()

        target = peer_key(peer_id)
        await self.queries.lookup(
            target, "find_node", {"target": target_bytes(target)}, deadline, on_answer
        )
        addrs: list[str] = []
        if reached:
            result = await self.queries.call(
                peer_id, (), "hello", {"addrs": self.hello_addrs()}, deadline
            )
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

    def _on_addresses_changed(self) -> None:
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(self._republish_peer_record)

    async def _republish_peer_record(self) -> None:
        """Our addresses changed: put the new ones in our peer record now, not at
        the next republish."""
        addrs = [a for a in self.node.addrs() if "/0.0.0.0/" not in a]
        try:
            await self.put(
                peer_record_key(self.peer_id),
                {"addrs": addrs},
                self.clock() + self.config.peer_record_ttl,
                timeout=10.0,
            )
        except GossamerError as exc:
            log.info("publishing our addresses in the DHT failed: %s", exc)

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

    # -------------------------------------------------------- serving (RPC side)

    def serve_find_value(self, key: str, caller: str) -> tuple[list[Entry], list[Contact]]:
        now = self.clock()
        entries = list(self.store.get(key, now).values())
        return entries, self.table.closest(key_id(key), exclude=caller)

    def serve_store(self, key: str, entries: list[Entry], caller: str) -> list[Contact]:
        """Validate and keep ``entries``; the contacts we know nearest ``key``."""
        now = self.clock()
        for entry in entries:
            self._validate(key, entry, now)
        for entry in entries:
            self.store.put(key, entry, caller, now)
        return self.table.closest(key_id(key), exclude=caller)

    def note_caller(self, peer_id: str) -> None:
        """An RPC from ``peer_id``: it is alive; learn its addresses if it is new."""
        contact = self.table.get(peer_id)
        if contact is not None:
            self.table.update(peer_id, (), self.clock())
        else:
            self.upkeep.schedule_hello(peer_id)

    def on_hello(self, peer_id: str, raw_addrs: Any) -> None:
        info = self.node.peers.get(peer_id)
        addrs = clean_addrs(peer_id, raw_addrs, info.remote_addr if info else "")
        if addrs:
            self.node.peers.add_addrs(peer_id, list(addrs))
        self.learned(peer_id, addrs)

    def learned(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """``peer_id`` answered us: into the routing table; the first contact starts the join."""
        if self.table.update(peer_id, addrs, self.clock()) and len(self.table) == 1:
            self._joined.set()

    async def republish(self) -> None:
        """Re-store our own unexpired records; refresh our provider and peer records."""
        await self.upkeep.republish()

    # ----------------------------------------------------------- persistence

    def _load(self) -> None:
        from gossamer.dht._persist import Persistence

        self._persist = Persistence(self.node.config.data_dir)
        now = self.clock()
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
        persist.write(records, own, contact_rows, now=self.clock())
        self.store.dirty.clear()
        self._own_dirty.clear()


async def attach(node: Node) -> None:
    """Daemon extension (``gossamer.dht:attach``): a DHT on ``node``, tuned by the config
    file's ``[dht]`` table if it has one."""
    await DHT.start(node, DHTConfig.from_table(node.config.tables.get("dht", {})))


@dataclass(frozen=True)
class _Signer:
    """The node key, loaded once (Identity.sign rebuilds it from the seed each call)."""

    peer_id: str
    private_key: Any

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)
