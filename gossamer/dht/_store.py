"""The records a node stores for others — pure bookkeeping with quotas, no I/O.

Entries arrive already validated.  The store keeps the newest version of each
(key, sub-key), drops expired ones, and bounds memory: per sending peer
(entries and bytes), per key (sub-keys and bytes) and in total.  What changed
since the last flush is in :attr:`RecordStore.dirty` for the persistence layer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from gossamer.dht._records import Entry, newer
from gossamer.dht.errors import QuotaExceeded, RecordTooLarge


@dataclass(frozen=True)
class StoreLimits:
    max_entries_per_peer: int = 10_000
    max_bytes_per_peer: int = 32 << 20
    max_entries: int = 200_000
    max_bytes: int = 512 << 20
    max_subkeys_per_key: int = 1024
    max_bytes_per_key: int = 1 << 20


@dataclass
class _Stored:
    entry: Entry
    origin: str
    size: int


class RecordStore:
    def __init__(self, self_peer_id: str, limits: StoreLimits | None = None) -> None:
        self.self_peer_id = self_peer_id
        self.limits = limits or StoreLimits()
        self._records: dict[str, dict[str, _Stored]] = {}
        self._key_bytes: defaultdict[str, int] = defaultdict(int)
        self._peer_entries: defaultdict[str, int] = defaultdict(int)
        self._peer_bytes: defaultdict[str, int] = defaultdict(int)
        self.total_entries = 0
        self.total_bytes = 0
        self.dirty: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return self.total_entries

    def keys(self) -> list[str]:
        return list(self._records)

    def get(self, key: str, now: float) -> dict[str, Entry]:
        """Unexpired entries under ``key`` by sub-key (expired ones are dropped on the way)."""
        subs = self._records.get(key)
        if not subs:
            return {}
        expired = [s for s, stored in subs.items() if stored.entry.expires_at <= now]
        for subkey in expired:
            self._remove(key, subkey)
        subs = self._records.get(key, {})
        return {s: stored.entry for s, stored in subs.items()}

    def origin_of(self, key: str, subkey: str) -> str | None:
        stored = self._records.get(key, {}).get(subkey)
        return None if stored is None else stored.origin

    def put(self, key: str, entry: Entry, origin: str, now: float) -> bool:
        """Keep ``entry`` if it is newer than what we hold; True if the store changed.

        Raises QuotaExceeded / RecordTooLarge when keeping it would pass a bound.
        """
        if entry.expires_at <= now:
            return False
        subs = self._records.get(key, {})
        current = subs.get(entry.subkey)
        if current is not None and current.entry.expires_at <= now:
            self._remove(key, entry.subkey)
            subs = self._records.get(key, {})
            current = None
        if current is not None and newer(current.entry, entry) is current.entry:
            return False
        size = len(key) + len(entry.value) + len(entry.subkey) + len(entry.sig) + 64
        old_size = current.size if current is not None else 0
        limits = self.limits
        if current is None and len(subs) >= limits.max_subkeys_per_key:
            raise QuotaExceeded(f"{key} already holds {len(subs)} sub-keys")
        if self._key_bytes[key] - old_size + size > limits.max_bytes_per_key:
            raise RecordTooLarge(
                f"{key} would hold more than {limits.max_bytes_per_key} bytes of sub-keys"
            )
        if origin != self.self_peer_id:
            same_origin = current is not None and current.origin == origin
            entries = self._peer_entries[origin] + (0 if same_origin else 1)
            used = self._peer_bytes[origin] + size - (old_size if same_origin else 0)
            if entries > limits.max_entries_per_peer or used > limits.max_bytes_per_peer:
                raise QuotaExceeded(
                    f"this node holds as many records from {origin[-8:]} as it accepts"
                )
        if (
            self.total_entries + (current is None) > limits.max_entries
            or self.total_bytes - old_size + size > limits.max_bytes
        ):
            raise QuotaExceeded("this node's record store is full")
        if current is not None:
            self._remove(key, entry.subkey, mark_dirty=False)
        self._records.setdefault(key, {})[entry.subkey] = _Stored(entry, origin, size)
        self._key_bytes[key] += size
        self._peer_entries[origin] += 1
        self._peer_bytes[origin] += size
        self.total_entries += 1
        self.total_bytes += size
        self.dirty.add((key, entry.subkey))
        return True

    def purge(self, now: float) -> int:
        """Drop every expired entry; the number dropped."""
        doomed = [
            (key, subkey)
            for key, subs in self._records.items()
            for subkey, stored in subs.items()
            if stored.entry.expires_at <= now
        ]
        for key, subkey in doomed:
            self._remove(key, subkey)
        return len(doomed)

    def _remove(self, key: str, subkey: str, mark_dirty: bool = True) -> None:
        subs = self._records.get(key)
        if subs is None or subkey not in subs:
            return
        stored = subs.pop(subkey)
        if not subs:
            del self._records[key]
        self._key_bytes[key] -= stored.size
        if self._key_bytes[key] <= 0:
            del self._key_bytes[key]
        self._peer_entries[stored.origin] -= 1
        self._peer_bytes[stored.origin] -= stored.size
        if self._peer_entries[stored.origin] <= 0:
            del self._peer_entries[stored.origin]
            del self._peer_bytes[stored.origin]
        self.total_entries -= 1
        self.total_bytes -= stored.size
        if mark_dirty:
            self.dirty.add((key, subkey))

    def entries_from(self, origin: str) -> int:
        return self._peer_entries.get(origin, 0)

    def stored(self, key: str, subkey: str) -> tuple[Entry, str] | None:
        """(entry, origin) as held, expired or not (for persistence)."""
        stored = self._records.get(key, {}).get(subkey)
        return None if stored is None else (stored.entry, stored.origin)
