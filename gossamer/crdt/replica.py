"""One replica of a run document: a pycrdt doc, the signed envelopes behind it, and the checks.

This is the protocol core — no I/O, no clock, no network (h11 style).  Envelopes
come in through :meth:`Replica.receive` and are either applied, recognised as
duplicates, parked until the author's earlier updates arrive, stored as a
compaction of what we have, or refused with a reason.  Local edits go through
:meth:`Replica.write`, which produces the signed envelope to send.

What the replica keeps besides the pycrdt doc:

* ``_log``: per author, the envelopes that together cover the author's clocks
  ``0..clock`` — this is what we serve to peers and persist; we cannot serve
  ``Doc.get_update()`` because a merged update carries nobody's signature.
* ``_index``: per author, for every clock, the (root, key) its item lives in.
  An overwrite in yrs names its predecessor (the *origin*) instead of its key,
  so this index is how a receiver knows which key an update writes before
  applying it.  4 bytes per item ever written.
* ``_progress``: the last forward-only position of round/plan/fragment keys.

Causality is simple by construction: an author's items only refer to the
author's own earlier items (rules.py, rule 1), so an envelope can be applied
as soon as the author's previous clocks are here, whatever other authors did.
"""

from __future__ import annotations

import enum
import logging
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Map

from gossamer.crdt import _yupdate, rules
from gossamer.crdt.charter import Charter
from gossamer.crdt.envelope import Envelope, client_id_for
from gossamer.node import GossamerError, Identity, ProtocolError, peer_id_from_public_key, wire

log = logging.getLogger(__name__)

LOCAL_ORIGIN = "gossamer.crdt.local"
REMOTE_ORIGIN = "gossamer.crdt.remote"


class Verdict(enum.Enum):
    APPLIED = "applied"  # new clocks, checked and applied
    DUPLICATE = "duplicate"  # nothing new
    PENDING = "pending"  # signature checked; waits for the author's earlier updates
    STORED = "stored"  # a compaction (checkpoint) of clocks we already had
    REFUSED = "refused"


class Severity(enum.Enum):
    NONE = "none"
    FORBIDDEN = "forbidden"  # well-formed and signed, but breaks a rule
    MALFORMED = "malformed"  # bad bytes, bad signature, spoofed client id


@dataclass(frozen=True)
class Receipt:
    verdict: Verdict
    envelope: Envelope | None = None
    reason: str = ""
    severity: Severity = Severity.NONE
    touched: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.REFUSED


@dataclass
class Limits:
    max_update_bytes: int = 64 << 20
    max_config_value_bytes: int = 32 << 20
    max_pending_bytes: int = 128 << 20
    max_pending: int = 4096
    max_pending_per_author: int = 512
    max_authors: int = 100_000
    # distinct keys one author may write: a member's own keys are a handful (its record,
    # heartbeat, round, metrics, a key per fragment or expert it serves), and a member that
    # invents keys must not grow every replica's document (and this index) without bound
    max_keys_per_author: int = 4096


class WriteError(GossamerError):
    """A local write breaks the run's rules (e.g. a non-host writing the config)."""


Listener = Callable[[Receipt, Any], None]


@dataclass
class _Pending:
    envelope: Envelope
    source: Any


@dataclass
class _Checked:
    new_keys: array
    progress: dict[int, rules.Progress] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)


class Replica:
    def __init__(
        self, charter: Charter, identity: Identity | None = None, limits: Limits | None = None
    ) -> None:
        self.charter = charter
        self.run_id = charter.run_id
        self.identity = identity
        self.limits = limits or Limits()
        self.peer_id = identity.peer_id if identity else None
        self.client_id = client_id_for(identity.public_key_bytes) if identity else None
        self.doc: Doc = Doc(client_id=self.client_id)
        self.maps: dict[str, Map] = {root: self.doc.get(root, type=Map) for root in rules.ROOTS}
        self._clock: dict[int, int] = {}
        self._index: dict[int, array] = {}
        self._keys: list[tuple[str, str]] = []
        self._key_ids: dict[tuple[str, str], int] = {}
        self._authors: dict[int, bytes] = {}
        self._blocked: set[int] = set()
        self._log: dict[int, list[Envelope]] = {}
        self._progress: dict[int, rules.Progress] = {}
        self._author_keys: dict[int, set[int]] = {}  # client -> the key ids it has written
        self._pending: dict[int, dict[int, _Pending]] = {}
        self._pending_bytes = 0
        self._pending_count = 0
        self._listeners: list[Listener] = []
        self.log_bytes = 0
        self.log_count = 0
        # Called with each envelope added to the log (persistence); not during load.
        self.persist: Callable[[Envelope], None] | None = None

    # ------------------------------------------------------------- queries

    def state_vector(self) -> dict[int, int]:
        return dict(self._clock)

    def clock_of(self, client: int) -> int:
        return self._clock.get(client, 0)

    def author_key(self, client: int) -> bytes | None:
        return self._authors.get(client)

    def author_peer(self, client: int) -> str | None:
        key = self._authors.get(client)
        return None if key is None else peer_id_from_public_key(key)

    def missing_for(self, state: dict[int, int]) -> Iterator[Envelope]:
        """Envelopes a peer whose state vector is ``state`` lacks, each author in clock order."""
        for client, envelopes in self._log.items():
            have = state.get(client, 0)
            if have >= self._clock.get(client, 0):
                continue
            for envelope in envelopes:
                if envelope.span[1] > have:
                    yield envelope

    def envelopes(self) -> Iterator[Envelope]:
        for envelopes in self._log.values():
            yield from envelopes

    def pending_count(self) -> int:
        return self._pending_count

    def get(self, root: str, key: str) -> Any:
        """The decoded value at ``root[key]`` (None when absent or withdrawn)."""
        raw = self.maps[root].get(key)
        return None if raw is None else _decode_value(raw)

    def items(self, root: str) -> Iterator[tuple[str, Any]]:
        for key, raw in self.maps[root].items():
            value = _decode_value(raw)
            if value is not None:
                yield key, value

    def progress(self, root: str, key: str) -> rules.Progress | None:
        kid = self._key_ids.get((root, key))
        return None if kid is None else self._progress.get(kid)

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """Every root as plain Python: equal fingerprints mean equal documents."""
        return {root: dict(self.items(root)) for root in rules.ROOTS}

    def add_listener(self, listener: Listener) -> None:
        """``listener(receipt, source)`` for every envelope applied or stored (local ones too)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    # ------------------------------------------------------------- receive

    def receive(self, envelope: Envelope, source: Any = None, *, verified: bool = False) -> Receipt:
        """Check ``envelope`` and apply it if it may be applied; never raises for bad input."""
        if len(envelope.update) > self.limits.max_update_bytes:
            return self._refuse(
                envelope,
                f"update of {len(envelope.update)} bytes exceeds {self.limits.max_update_bytes}",
                Severity.MALFORMED,
            )
        try:
            decoded = envelope.decoded
        except _yupdate.UpdateFormatError as exc:
            return self._refuse(envelope, f"malformed update: {exc}", Severity.MALFORMED)
        client = client_id_for(envelope.author)
        if set(decoded.ranges) != {client}:
            return self._refuse(
                envelope,
                "client id spoofing: the update's structs are not all by the signing author",
                Severity.MALFORMED,
            )
        known_key = self._authors.get(client)
        if known_key is not None and known_key != envelope.author:
            return self._refuse(
                envelope, "client id already held by another key", Severity.MALFORMED
            )
        author = envelope.author_peer_id
        start, end = decoded.ranges[client]
        clock = self._clock.get(client, 0)
        if end <= clock:
            if start == 0 and self._would_compact(client, end):
                return self._store_checkpoint(envelope, client, verified, source)
            return Receipt(Verdict.DUPLICATE, envelope)
        if not self.charter.may_join(author):
            return self._refuse(
                envelope, f"{author[-8:]} is not admitted to run {self.run_id}", Severity.FORBIDDEN
            )
        if not verified and not envelope.verify(self.run_id):
            return self._refuse(envelope, "signature does not verify", Severity.MALFORMED)
        if client in self._blocked:
            return self._refuse(envelope, f"author {author[-8:]} broke the rules before")
        if len(self._authors) >= self.limits.max_authors and client not in self._authors:
            return self._refuse(envelope, "too many authors in this run")
        if start > clock:
            return self._park(envelope, client, start, source)
        receipt = self._integrate(envelope, client, clock, apply=True, source=source)
        if receipt.verdict is Verdict.APPLIED:
            self._drain_pending(client)
        return receipt

    def _refuse(
        self, envelope: Envelope, reason: str, severity: Severity = Severity.NONE
    ) -> Receipt:
        return Receipt(Verdict.REFUSED, envelope, reason, severity)

    def _park(self, envelope: Envelope, client: int, start: int, source: Any) -> Receipt:
        slot = self._pending.setdefault(client, {})
        if start in slot:
            return Receipt(Verdict.PENDING, envelope)
        size = len(envelope.update)
        if (
            len(slot) >= self.limits.max_pending_per_author
            or self._pending_count >= self.limits.max_pending
            or self._pending_bytes + size > self.limits.max_pending_bytes
        ):
            return Receipt(Verdict.DUPLICATE, envelope, "pending buffer full; dropped")
        slot[start] = _Pending(envelope, source)
        self._pending_bytes += size
        self._pending_count += 1
        return Receipt(Verdict.PENDING, envelope)

    def _drain_pending(self, client: int) -> None:
        slot = self._pending.get(client)
        while slot:
            clock = self._clock.get(client, 0)
            ready = [s for s in slot if s <= clock]
            if not ready:
                break
            for start in ready:
                item = slot.pop(start)
                self._pending_bytes -= len(item.envelope.update)
                self._pending_count -= 1
                if item.envelope.span[1] > self._clock.get(client, 0):
                    receipt = self._integrate(
                        item.envelope, client, self._clock.get(client, 0), True, item.source
                    )
                    if receipt.verdict is Verdict.REFUSED:
                        log.warning("refused parked update: %s", receipt.reason)
                        self._notify(receipt, item.source)
        if slot is not None and not slot:
            self._pending.pop(client, None)

    def _integrate(
        self, envelope: Envelope, client: int, clock: int, apply: bool, source: Any
    ) -> Receipt:
        author = envelope.author_peer_id
        mark = len(self._keys)
        try:
            checked = self._check(envelope, client, clock, author)
        except rules.RuleViolation as exc:
            # forget the key ids the refused update made up: a liar must leave nothing behind
            for pair in self._keys[mark:]:
                del self._key_ids[pair]
            del self._keys[mark:]
            self._blocked.add(client)
            self._drop_pending(client)
            return self._refuse(envelope, str(exc), Severity.FORBIDDEN)
        if apply:
            try:
                with self.doc.transaction(origin=REMOTE_ORIGIN):
                    self.doc.apply_update(envelope.update)
            except Exception as exc:  # yrs refuses bytes our decoder accepted: refuse too
                return self._refuse(
                    envelope, f"pycrdt refused the update: {exc}", Severity.MALFORMED
                )
        end = envelope.span[1]
        self._index.setdefault(client, array("I")).extend(checked.new_keys)
        self._author_keys.setdefault(client, set()).update(checked.new_keys)
        self._clock[client] = end
        self._progress.update(checked.progress)
        self._authors[client] = envelope.author
        self._add_to_log(client, envelope)
        receipt = Receipt(Verdict.APPLIED, envelope, touched=frozenset(checked.touched))
        self._notify(receipt, source)
        return receipt

    def _check(self, envelope: Envelope, client: int, clock: int, author: str) -> _Checked:
        """What the update writes, or RuleViolation; pure with respect to our state."""
        decoded = envelope.decoded
        is_host = self.charter.is_host(author)
        base = self._index.get(client, array("I"))
        checked = _Checked(new_keys=array("I"))
        new_keys = checked.new_keys
        allowed: set[int] = set()
        own_keys = self._author_keys.get(client, set())
        new_kids: set[int] = set()
        max_config = self.limits.max_config_value_bytes
        for item in decoded.items:
            item_end = item.clock + item.length
            if item_end <= clock:
                continue  # already have it (a checkpoint overlapping our state)
            if item.origin is not None:
                origin_client, origin_clock = item.origin
                if origin_client != client:
                    raise rules.RuleViolation("an item may only follow its author's own items")
                if origin_clock < clock:
                    kid = base[origin_clock]
                elif origin_clock - clock < len(new_keys):
                    kid = new_keys[origin_clock - clock]
                else:
                    raise rules.RuleViolation("an item follows an item that does not exist yet")
            else:
                assert item.root is not None and item.key is not None
                if item.root not in self.maps:
                    raise rules.RuleViolation(f"unknown root {item.root!r}")
                # the key's rules before it gets an id: a refused update must leave nothing
                rules.check_key(item.root, item.key, author, is_host=is_host)
                kid = self._key_id(item.root, item.key)
                allowed.add(kid)
            root, key = self._keys[kid]
            if kid not in allowed:
                rules.check_key(root, key, author, is_host=is_host)
                allowed.add(kid)
            if kid not in own_keys and kid not in new_kids:
                new_kids.add(kid)
                if len(own_keys) + len(new_kids) > self.limits.max_keys_per_author:
                    raise rules.RuleViolation(
                        f"an author may write at most {self.limits.max_keys_per_author} keys"
                    )
            if not item.deleted:
                assert item.value is not None
                try:
                    value = _decode_value(item.value)
                except ProtocolError as exc:
                    raise rules.RuleViolation(
                        f"{root}[{key[:60]!r}] is not msgpack: {exc}"
                    ) from None
                rules.check_value(root, key, value, len(item.value), max_config_bytes=max_config)
                after = rules.progress_of(root, key, value)
                if after is not None:
                    before = checked.progress.get(kid, self._progress.get(kid))
                    rules.check_progress(root, key, before, after)
                    checked.progress[kid] = after
            first = max(item.clock, clock)
            new_keys.extend([kid] * (item_end - first))
            checked.touched.add(root)
        end = clock + len(new_keys)
        for del_client, ranges in decoded.deletes.items():
            if del_client != client:
                raise rules.RuleViolation("an update may only delete its author's own items")
            for del_clock, length in ranges:
                if del_clock + length > end:
                    raise rules.RuleViolation("an update deletes items that do not exist")
        return checked

    def _key_id(self, root: str, key: str) -> int:
        pair = (root, key)
        kid = self._key_ids.get(pair)
        if kid is None:
            kid = self._key_ids[pair] = len(self._keys)
            self._keys.append(pair)
        return kid

    def _drop_pending(self, client: int) -> None:
        for item in self._pending.pop(client, {}).values():
            self._pending_bytes -= len(item.envelope.update)
            self._pending_count -= 1

    def _notify(self, receipt: Receipt, source: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(receipt, source)
            except Exception:
                log.exception("run document listener failed")

    # ---------------------------------------------------- log and compaction

    def _add_to_log(self, client: int, envelope: Envelope) -> None:
        start, end = envelope.span
        entries = self._log.setdefault(client, [])
        if not entries or entries[-1].span[1] <= start:  # the usual case: next in line
            entries.append(envelope)
            self.log_bytes += len(envelope.update)
            self.log_count += 1
            if self.persist is not None:
                self.persist(envelope)
            return
        kept = []
        for old in entries:
            old_start, old_end = old.span
            if old_start >= start and old_end <= end:
                self.log_bytes -= len(old.update)
                self.log_count -= 1
            else:
                kept.append(old)
        kept.append(envelope)
        kept.sort(key=lambda e: e.span[0])
        self._log[client] = kept
        self.log_bytes += len(envelope.update)
        self.log_count += 1
        if self.persist is not None:
            self.persist(envelope)

    def _would_compact(self, client: int, end: int) -> bool:
        inside = [e for e in self._log.get(client, ()) if e.span[1] <= end]
        return len(inside) > 1

    def _store_checkpoint(
        self, envelope: Envelope, client: int, verified: bool, source: Any
    ) -> Receipt:
        """Keep a signed compaction of clocks we already have, if it agrees with them."""
        if not verified and not envelope.verify(self.run_id):
            return self._refuse(envelope, "signature does not verify", Severity.MALFORMED)
        base = self._index.get(client, array("I"))
        for item in envelope.decoded.items:
            if item.origin is not None:
                if item.origin[0] != client or item.origin[1] >= len(base):
                    return self._refuse(
                        envelope, "checkpoint refers to unknown items", Severity.MALFORMED
                    )
                kid = base[item.origin[1]]
            else:
                kid = self._key_ids.get((item.root or "", item.key or ""), -1)
            if any(base[c] != kid for c in range(item.clock, item.clock + item.length)):
                return self._refuse(
                    envelope, "checkpoint disagrees with the author's updates", Severity.MALFORMED
                )
        self._add_to_log(client, envelope)
        receipt = Receipt(Verdict.STORED, envelope)
        self._notify(receipt, source)
        return receipt

    def make_checkpoint(self) -> Envelope | None:
        """Sign one update holding all our own items so far (replacing our envelopes).

        Worth it once many of our updates overwrote each other: overwritten
        values are stored as deleted items of a few bytes each.
        """
        if self.identity is None or self.client_id is None:
            return None
        client = self.client_id
        if len(self._log.get(client, ())) < 2:
            return None
        others = {c: v for c, v in self._clock.items() if c != client}
        update = self.doc.get_update(_yupdate.encode_state_vector(others))
        update = _yupdate.restrict_delete_set(update, client)
        envelope = Envelope.sign(self.identity, self.run_id, update)
        receipt = self._store_checkpoint(envelope, client, True, None)
        return envelope if receipt.verdict is Verdict.STORED else None

    def own_log_length(self) -> int:
        return len(self._log.get(self.client_id, ())) if self.client_id is not None else 0

    # ----------------------------------------------------------------- write

    def write(self, changes: Iterable[tuple[str, str, Any]]) -> Envelope:
        """Set ``root[key] = value`` for each change in one signed update; returns it.

        Raises WriteError when the change breaks the rules — checked before
        anything touches the document.
        """
        if self.identity is None or self.peer_id is None:
            raise WriteError("this replica has no identity to sign with")
        me = self.peer_id
        if not self.charter.may_join(me):
            raise WriteError(f"this node is not admitted to run {self.run_id}")
        is_host = self.charter.is_host(me)
        encoded: list[tuple[str, str, bytes]] = []
        progress: dict[tuple[str, str], rules.Progress] = {}
        for root, key, value in changes:
            blob = wire.pack(value)
            try:
                rules.check_key(root, key, me, is_host=is_host)
                rules.check_value(
                    root, key, value, len(blob), max_config_bytes=self.limits.max_config_value_bytes
                )
                after = rules.progress_of(root, key, value)
                before = progress.get((root, key), self.progress(root, key))
                rules.check_progress(root, key, before, after)
            except rules.RuleViolation as exc:
                raise WriteError(str(exc)) from None
            if after is not None:
                progress[(root, key)] = after
            encoded.append((root, key, blob))
        if not encoded:
            raise WriteError("nothing to write")
        captured: list[bytes] = []
        subscription = self.doc.observe(lambda event: captured.append(event.update))
        try:
            with self.doc.transaction(origin=LOCAL_ORIGIN):
                for root, key, blob in encoded:
                    self.maps[root][key] = blob
        finally:
            self.doc.unobserve(subscription)
        if len(captured) != 1:
            raise GossamerError(f"expected one update from a local write, got {len(captured)}")
        envelope = Envelope.sign(self.identity, self.run_id, captured[0])
        receipt = self._integrate(
            envelope, self.client_id or 0, self.clock_of(self.client_id or 0), False, None
        )
        if receipt.verdict is not Verdict.APPLIED:
            raise GossamerError(f"our own update does not pass our own checks: {receipt.reason}")
        return envelope

    # ------------------------------------------------------------------ load

    def load(self, envelopes: Iterable[Envelope]) -> int:
        """Re-apply envelopes from our own disk (no signature checks); returns how many applied."""
        persist, self.persist = self.persist, None
        applied = 0
        try:
            for envelope in envelopes:
                receipt = self.receive(envelope, verified=True)
                if receipt.verdict in (Verdict.APPLIED, Verdict.STORED):
                    applied += 1
                elif receipt.verdict is Verdict.REFUSED:
                    log.warning("stored update refused on load: %s", receipt.reason)
        finally:
            self.persist = persist
        return applied

    def set_charter(self, charter: Charter) -> bool:
        """Adopt a newer version of our run's charter; True if adopted."""
        if charter.run_id != self.run_id or charter.version <= self.charter.version:
            return False
        self.charter = charter
        return True


def _decode_value(raw: bytes | bytearray) -> Any:
    return wire.unpack(bytes(raw), max_container=100_000)
