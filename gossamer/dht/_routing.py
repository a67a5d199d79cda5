"""Kademlia keyspace and k-bucket routing table — pure bookkeeping, no I/O.

Ids live in a 256-bit space: a peer's id is the SHA-256 of its peer id bytes,
a key's is the SHA-256 of the key string; distance is XOR.  Bucket ``i`` holds
contacts whose distance from us has bit length ``i + 1``.  A full bucket keeps
its contacts (long-lived peers are the likeliest to stay) and parks newcomers
in a bounded replacement cache, promoted when a member is evicted after failed
calls.  The DHT feeds the table: peers that answer or call us go in, failures
come out; the table never does I/O itself.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field

import base58

BITS = 256


def key_id(key: str) -> int:
    """Keyspace position of a record key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest(), "big")


@functools.lru_cache(maxsize=65536)
def peer_key(peer_id: str) -> int:
    """Keyspace position of a peer: SHA-256 over its (multihash) peer id bytes."""
    return int.from_bytes(hashlib.sha256(base58.b58decode(peer_id)).digest(), "big")


def target_bytes(target: int) -> bytes:
    """A keyspace position as the 32 bytes ``find_node`` carries."""
    return target.to_bytes(32, "big")


def bucket_index(self_id: int, other: int) -> int:
    """Index of the bucket ``other`` falls in, -1 for ourselves."""
    return (self_id ^ other).bit_length() - 1


@dataclass
class Contact:
    peer_id: str
    addrs: tuple[str, ...] = ()
    last_seen: float = 0.0
    failures: int = 0
    id: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.id = peer_key(self.peer_id)


class RoutingTable:
    """k-buckets around ``self_peer_id``."""

    def __init__(self, self_peer_id: str, k: int = 20, max_failures: int = 2) -> None:
        self.self_peer_id = self_peer_id
        self.self_id = peer_key(self_peer_id)
        self.k = k
        self.max_failures = max_failures
        self._buckets: list[list[Contact]] = [[] for _ in range(BITS)]  # oldest first
        self._replacements: list[list[Contact]] = [[] for _ in range(BITS)]
        self._by_peer: dict[str, Contact] = {}
        self._refreshed: list[float] = [0.0] * BITS

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._by_peer)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._by_peer

    def get(self, peer_id: str) -> Contact | None:
        return self._by_peer.get(peer_id)

    def peers(self) -> list[Contact]:
        return list(self._by_peer.values())

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b) for i, b in enumerate(self._buckets) if b}

    def closest(
        self, target: int, n: int | None = None, exclude: str | None = None
    ) -> list[Contact]:
        """The ``n`` (default k) contacts nearest ``target``."""
        n = self.k if n is None else n
        pool = (c for c in self._by_peer.values() if c.peer_id != exclude)
        return sorted(pool, key=lambda c: c.id ^ target)[:n]

    # ---------------------------------------------------------------- updates

    def update(self, peer_id: str, addrs: tuple[str, ...] | list[str], now: float) -> bool:
        """Record that ``peer_id`` is alive (it answered or called us).  True if in a bucket."""
        if peer_id == self.self_peer_id:
            return False
        contact = self._by_peer.get(peer_id)
        if contact is not None:
            contact.last_seen = now
            contact.failures = 0
            if addrs:
                contact.addrs = tuple(addrs)
            bucket = self._buckets[bucket_index(self.self_id, contact.id)]
            bucket.remove(contact)
            bucket.append(contact)
            return True
        contact = Contact(peer_id, tuple(addrs), now)
        index = bucket_index(self.self_id, contact.id)
        bucket = self._buckets[index]
        if len(bucket) < self.k:
            bucket.append(contact)
            self._by_peer[peer_id] = contact
            self._drop_replacement(index, peer_id)
            return True
        # Full: a member that already failed makes room, else park the newcomer.
        worst = next((c for c in bucket if c.failures > 0), None)
        if worst is not None:
            self._evict(worst)
            bucket.append(contact)
            self._by_peer[peer_id] = contact
            self._drop_replacement(index, peer_id)
            return True
        cache = self._replacements[index]
        self._drop_replacement(index, peer_id)
        cache.append(contact)
        del cache[: -self.k]
        return False

    def record_failure(self, peer_id: str, definitive: bool = False) -> bool:
        """A call to ``peer_id`` failed; True if it was evicted.

        ``definitive`` (a refused dial): evict at once.  Otherwise (a timeout,
        a connection that broke) the contact goes after ``max_failures`` in a
        row, and only when a replacement is waiting: as the Kademlia paper
        says, a stale contact is better than none, or an overloaded or briefly
        cut-off node would empty its own table and be left with nobody.
        """
        contact = self._by_peer.get(peer_id)
        if contact is None:
            for cache in self._replacements:
                cache[:] = [c for c in cache if c.peer_id != peer_id]
            return False
        contact.failures += 1
        index = bucket_index(self.self_id, contact.id)
        if definitive or (contact.failures >= self.max_failures and self._replacements[index]):
            self._evict(contact)
            return True
        return False

    def remove(self, peer_id: str) -> None:
        contact = self._by_peer.get(peer_id)
        if contact is not None:
            self._evict(contact)

    def _evict(self, contact: Contact) -> None:
        index = bucket_index(self.self_id, contact.id)
        self._buckets[index].remove(contact)
        del self._by_peer[contact.peer_id]
        cache = self._replacements[index]
        if cache:
            promoted = cache.pop()  # most recently seen
            promoted.failures = 0
            self._buckets[index].append(promoted)
            self._by_peer[promoted.peer_id] = promoted

    def _drop_replacement(self, index: int, peer_id: str) -> None:
        cache = self._replacements[index]
        for i, c in enumerate(cache):
            if c.peer_id == peer_id:
                del cache[i]
                return

    # ---------------------------------------------------------------- refresh

    def mark_refreshed(self, target: int, now: float) -> None:
        """A lookup for ``target`` ran: its bucket counts as fresh."""
        index = bucket_index(self.self_id, target)
        if index >= 0:
            self._refreshed[index] = now

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Buckets worth a refresh lookup: from the nearest non-empty one outwards,
        those not looked up in the last ``interval`` seconds."""
        nonempty = [i for i, b in enumerate(self._buckets) if b]
        if not nonempty:
            return []
        return [i for i in range(nonempty[0], BITS) if now - self._refreshed[i] >= interval]

    def random_id_in_bucket(self, index: int, rng: random.Random | None = None) -> int:
        """A random id whose distance from us falls in bucket ``index``."""
        rng = rng or random
        distance = (1 << index) | rng.getrandbits(index) if index > 0 else 1
        return self.self_id ^ distance
