"""Persistence of a run document under ``<data_dir>/crdt/<run id>/``.

* ``charter.bin`` — the newest charter we adopted (signed, so it is re-verified on load).
* ``log.bin`` — a magic header, then length-prefixed stored envelopes
  (``[key, signature, update]``), appended as they are accepted.

Appends are flushed at once and fsynced every ``fsync_every`` appends and on
close; a crash can lose at most the last few updates, which the next sync
brings back from peers.  A torn tail (a crash mid-append) is cut off on load.
Compaction rewrites the file from the replica's current envelopes (after
checkpoints replaced older ones) into a temporary file that is then renamed
over the log, so a crash during compaction leaves the old log intact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from gossamer.crdt.charter import Charter, CharterError
from gossamer.crdt.envelope import Envelope
from gossamer.node import ProtocolError, wire

log = logging.getLogger(__name__)

MAGIC = b"GSMRCRDT\x01\n"
MAX_RECORD = 1 << 30


class RunStore:
    def __init__(self, directory: Path, fsync_every: int = 64) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / "log.bin"
        self.charter_path = self.directory / "charter.bin"
        self._fh: BinaryIO | None = None
        self._since_fsync = 0
        self._fsync_every = fsync_every
        self.file_bytes = 0

    # --------------------------------------------------------------- charter

    def save_charter(self, charter: Charter) -> None:
        tmp = self.charter_path.with_suffix(".tmp")
        tmp.write_bytes(charter.encode())
        os.replace(tmp, self.charter_path)

    def load_charter(self, run_id: str) -> Charter | None:
        if not self.charter_path.exists():
            return None
        try:
            return Charter.decode(self.charter_path.read_bytes(), run_id)
        except CharterError as exc:
            log.warning("ignoring stored charter %s: %s", self.charter_path, exc)
            return None

    # ------------------------------------------------------------------- log

    def load(self) -> Iterator[Envelope]:
        """Stored envelopes in append order; cuts a torn or corrupt tail off the file."""
        if not self.log_path.exists():
            return
        good = 0
        with open(self.log_path, "rb") as fh:
            head = fh.read(len(MAGIC))
            if head != MAGIC:
                log.warning("%s is not a run log; starting empty", self.log_path)
                fh.close()
                os.replace(self.log_path, self.log_path.with_suffix(".bad"))
                return
            good = len(MAGIC)
            while True:
                header = fh.read(wire.LENGTH.size)
                if len(header) < wire.LENGTH.size:
                    break
                (size,) = wire.LENGTH.unpack(header)
                if size > MAX_RECORD:
                    break
                payload = fh.read(size)
                if len(payload) < size:
                    break
                try:
                    envelope = Envelope.from_disk(payload)
                except ProtocolError:
                    break
                good = fh.tell()
                yield envelope
        size = self.log_path.stat().st_size
        if good < size:
            log.warning("cutting %d torn bytes off %s", size - good, self.log_path)
            with open(self.log_path, "r+b") as fh:
                fh.truncate(good)
        self.file_bytes = good

    def append(self, envelope: Envelope) -> None:
        fh = self._open()
        record = wire.frame(envelope.to_disk())
        fh.write(record)
        fh.flush()
        self.file_bytes += len(record)
        self._since_fsync += 1
        if self._since_fsync >= self._fsync_every:
            os.fsync(fh.fileno())
            self._since_fsync = 0

    def _open(self) -> BinaryIO:
        if self._fh is None:
            new = not self.log_path.exists() or self.log_path.stat().st_size == 0
            self._fh = open(self.log_path, "ab")  # noqa: SIM115 - kept open for appends
            if new:
                self._fh.write(MAGIC)
                self.file_bytes = len(MAGIC)
            else:
                self.file_bytes = self.log_path.stat().st_size
        return self._fh

    def compact(self, envelopes: Iterator[Envelope]) -> int:
        """Rewrite the log with exactly ``envelopes``; returns the new size in bytes."""
        self.close()
        tmp = self.log_path.with_suffix(".tmp")
        size = len(MAGIC)
        with open(tmp, "wb") as fh:
            fh.write(MAGIC)
            for envelope in envelopes:
                record = wire.frame(envelope.to_disk())
                fh.write(record)
                size += len(record)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.log_path)
        self.file_bytes = size
        return size

    def should_compact(self, live_bytes: int, min_bytes: int = 1 << 20) -> bool:
        """True when most of the file is envelopes that checkpoints replaced."""
        return self.file_bytes > min_bytes and self.file_bytes > 2 * (live_bytes + len(MAGIC))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._since_fsync = 0

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None
