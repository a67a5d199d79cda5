"""A DHT's background work: hellos, joining, bucket refresh, republishing, purging.

Kademlia stays healthy only if a node keeps at it: it swaps addresses with
every peer it connects to (``hello``), joins with a lookup of its own id once
someone answers, refreshes buckets nobody looked up for a while, re-stores its
own records before they fall off the replicas, purges what expired and flushes
what changed to disk.  Each is a loop in the DHT's nursery, jittered so that a
swarm started at once does not act in lockstep.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import trio

from gossamer.dht._records import Entry, peer_record_key, provider_key
from gossamer.dht._routing import peer_key, target_bytes
from gossamer.dht._service import clean_addrs
from gossamer.node import GossamerError, RemoteError

if TYPE_CHECKING:
    from gossamer.dht._dht import DHT

log = logging.getLogger(__name__)


class Upkeep:
    """The loops and hellos that keep one :class:`~gossamer.dht.DHT` joined and fresh."""

    def __init__(self, dht: DHT) -> None:
        self._dht = dht
        self.node = dht.node
        self.config = dht.config
        self.peer_id = dht.peer_id
        self.clock = dht.clock
        self.table = dht.table
        self.store = dht.store
        self.queries = dht.queries
        self._hello_pending: set[str] = set()
        self._hello_recent: dict[str, float] = {}

    def on_connection(self, peer_id: str, connected: bool) -> None:
        if not connected or self._dht._closed:
            return
        info = self.node.peers.get(peer_id)
        # The dialer says hello; the answering side learns the dialer from it.
        if info is None or info.direction != "inbound":
            self.schedule_hello(peer_id)

    def schedule_hello(self, peer_id: str) -> None:
        if self._dht._closed or self._dht._nursery is None or peer_id in self._hello_pending:
            return
        now = trio.current_time()
        if now - self._hello_recent.get(peer_id, -math.inf) < 2.0:
            return
        if len(self._hello_recent) > 4096:
            self._hello_recent = {p: t for p, t in self._hello_recent.items() if now - t < 2.0}
        self._hello_recent[peer_id] = now
        self._hello_pending.add(peer_id)
        self._dht._nursery.start_soon(self._hello, peer_id)

    async def _hello(self, peer_id: str, attempts: int = 3) -> None:
        """Swap addresses with ``peer_id``; retried while we stay connected to it."""
        try:
            delay = 0.2
            for attempt in range(attempts):
                result = await self.queries.call(
                    peer_id,
                    (),
                    "hello",
                    {"addrs": self._dht.hello_addrs()},
                    trio.current_time() + self.config.rpc_timeout_cap + self.config.dial_allowance,
                )
                if isinstance(result, dict):
                    self._dht.on_hello(peer_id, result.get("addrs"))
                    return
                if isinstance(result, RemoteError) or attempt == attempts - 1:
                    return  # it answered "no": not a DHT peer (or an incompatible one)
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay *= 2
                if not self.node.is_connected(peer_id):
                    return
        finally:
            self._hello_pending.discard(peer_id)

    async def reconcile_loop(self) -> None:
        """Greet connected peers that are not in the routing table (a hello that
        failed under load, a peer whose DHT started after we connected); with an
        empty table, also peers we know addresses of (rejoin after an outage)."""
        while True:
            await self._sleep_jittered(self.config.reconcile_interval)
            connected = self.node.connected_peers()
            for peer_id in connected:
                if peer_id not in self.table:
                    self.schedule_hello(peer_id)
            if not len(self.table):
                known = [p.peer_id for p in self.node.peers.all() if p.addrs]
                for peer_id in random.sample(known, min(8, len(known))):
                    self.schedule_hello(peer_id)

    @staticmethod
    async def _sleep_jittered(seconds: float) -> None:
        await trio.sleep(seconds * random.uniform(0.8, 1.2))

    async def reconnect_saved(self) -> None:
        """After a restart, greet a few peers we knew (rejoin without a bootstrap list)."""
        if self._dht._persist is None:
            return
        rows = self._dht._persist.contacts(self.config.reconnect_saved_contacts)
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

    async def refresh_loop(self) -> None:
        """Join once someone answers; refresh stale buckets; join afresh after an
        outage that emptied the routing table."""
        while True:
            await self._dht._joined.wait()
            if self.config.bootstrap_on_join:
                await self._bootstrap()
            self._dht.bootstrapped.set()
            period = self.config.refresh_interval / 4
            next_refresh = trio.current_time() + period
            while len(self.table):
                await self._sleep_jittered(min(self.config.reconcile_interval, period))
                if trio.current_time() < next_refresh:
                    continue
                next_refresh = trio.current_time() + period
                for index in self.table.stale_buckets(self.clock(), self.config.refresh_interval):
                    await self._quiet_lookup(self.table.random_id_in_bucket(index))
            self._dht._joined = trio.Event()
            if len(self.table):  # someone answered while we swapped events
                self._dht._joined.set()

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
            for index in self.table.stale_buckets(self.clock(), self.config.refresh_interval):
                if not sizes.get(index):
                    await self._quiet_lookup(self.table.random_id_in_bucket(index))
        if self.config.publish_peer_record:
            await self.publish_peer_record()
        self._dht.bootstrapped.set()

    async def _quiet_lookup(self, target: int) -> None:
        try:
            await self.queries.lookup(
                target,
                "find_node",
                {"target": target_bytes(target)},
                self.queries.deadline(None),
            )
        except GossamerError as exc:
            log.debug("dht: refresh lookup failed: %s", exc)

    async def publish_peer_record(self) -> None:
        addrs = self._dht.own_addrs()
        if not addrs:
            return
        try:
            await self._dht.put(
                peer_record_key(self.peer_id),
                {"addrs": list(addrs)},
                self.clock() + self.config.peer_record_ttl,
            )
        except GossamerError as exc:
            log.info("dht: publishing our peer record failed: %s", exc)

    async def republish_loop(self) -> None:
        while True:
            await trio.sleep(self.config.republish_interval * random.uniform(0.9, 1.1))
            await self.republish()

    async def republish(self) -> None:
        """Re-store our own unexpired records; refresh our provider and peer records."""
        now = self.clock()
        for content_id, ttl in list(self._dht._providing.items()):
            try:
                await self._dht.provide(content_id, ttl)
            except GossamerError as exc:
                log.info("dht: re-providing %s failed: %s", content_id[:40], exc)
        if self.config.publish_peer_record and len(self.table):
            await self.publish_peer_record()
        refreshed = {provider_key(c) for c in self._dht._providing} | {
            peer_record_key(self.peer_id)
        }
        by_key: dict[str, list[Entry]] = {}
        for (key, _), entry in list(self._dht._own.items()):
            if entry.expires_at > now and key not in refreshed:
                by_key.setdefault(key, []).append(entry)
        for key, entries in by_key.items():
            try:
                await self.queries.store_entries(key, entries, self.queries.deadline(None))
            except GossamerError as exc:
                log.info("dht: republishing %s failed: %s", key[:80], exc)

    async def maintenance_loop(self) -> None:
        last_purge = trio.current_time()
        while True:
            await trio.sleep(
                self.config.flush_interval if self._dht._persist else self.config.purge_interval
            )
            now = trio.current_time()
            if now - last_purge >= self.config.purge_interval:
                last_purge = now
                wall = self.clock()
                self.store.purge(wall)
                for slot, entry in list(self._dht._own.items()):
                    if entry.expires_at <= wall:
                        self._dht._own_del(slot)
            if self._dht._persist is not None:
                try:
                    self._dht._flush(contacts=now - last_purge < self.config.flush_interval)
                except Exception:
                    log.warning("dht: flushing to disk failed", exc_info=True)
