"""SQLite persistence of the DHT: stored records, our own records, known contacts.

One file, ``<data_dir>/dht.sqlite3``, in WAL mode.  Writes are batched: the
DHT flushes what changed every fraction of a second and when it stops, so a
store never waits on the disk.  Rows are re-validated when loaded, so a file
edited by hand cannot smuggle in a record the network would refuse.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "dht.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT NOT NULL, subkey TEXT NOT NULL, entry BLOB NOT NULL, origin TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (key, subkey));
CREATE TABLE IF NOT EXISTS own (
    key TEXT NOT NULL, subkey TEXT NOT NULL, entry BLOB NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (key, subkey));
CREATE TABLE IF NOT EXISTS contacts (
    peer_id TEXT PRIMARY KEY, addrs BLOB NOT NULL, last_seen REAL NOT NULL);
"""


class Persistence:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / FILE_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ----------------------------------------------------------------- loading

    def records(self, now: float) -> Iterator[tuple[str, bytes, str]]:
        rows = self._db.execute(
            "SELECT key, entry, origin FROM records WHERE expires_at > ?", (now,)
        ).fetchall()
        yield from rows

    def own(self, now: float) -> Iterator[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT key, entry FROM own WHERE expires_at > ?", (now,)
        ).fetchall()
        yield from rows

    def contacts(self, limit: int = 256) -> list[tuple[str, bytes, float]]:
        return self._db.execute(
            "SELECT peer_id, addrs, last_seen FROM contacts ORDER BY last_seen DESC LIMIT ?",
            (limit,),
        ).fetchall()

    # ----------------------------------------------------------------- writing

    def write(
        self,
        records: Iterable[tuple[str, str, bytes | None, str, float]],
        own: Iterable[tuple[str, str, bytes | None, float]],
        contacts: Iterable[tuple[str, bytes, float]] | None = None,
        now: float | None = None,
    ) -> None:
        """Upsert (blob not None) or delete (blob None) rows in one transaction."""
        db = self._db
        db.execute("BEGIN")
        try:
            for key, subkey, blob, origin, expires_at in records:
                if blob is None:
                    db.execute("DELETE FROM records WHERE key=? AND subkey=?", (key, subkey))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                        (key, subkey, blob, origin, expires_at),
                    )
            for key, subkey, blob, expires_at in own:
                if blob is None:
                    db.execute("DELETE FROM own WHERE key=? AND subkey=?", (key, subkey))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO own VALUES (?, ?, ?, ?)",
                        (key, subkey, blob, expires_at),
                    )
            if contacts is not None:
                db.execute("DELETE FROM contacts")
                db.executemany("INSERT OR REPLACE INTO contacts VALUES (?, ?, ?)", contacts)
            if now is not None:
                db.execute("DELETE FROM records WHERE expires_at <= ?", (now,))
                db.execute("DELETE FROM own WHERE expires_at <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
