"""Records: keys, entries, signatures, validation and merging — pure, no I/O.

A *key* is a namespaced path ``/gossamer/<kind>/<rest>``.  What a key holds is
a set of *entries*, one per sub-key; the plain value (``put`` without a
sub-key) is the entry under the empty sub-key ``""``.  Each entry carries its
own writer timestamp and expiry, so replicas merge entry by entry: for one
sub-key the newest timestamp wins, ties broken by the later expiry, then by the
bytes of the value, signer and signature (a total order, so every replica picks
the same winner whatever order updates arrive in).

Ownership: a key whose path has a segment that is an Ed25519 peer id (e.g.
``/gossamer/peer/<peer_id>``) belongs to that peer; otherwise a sub-key that is
a peer id belongs to that peer.  An owned entry is accepted only with a valid
signature by the owner; an entry that carries a signature must verify even
where none is required.  Further checks plug in per namespace (*kind*) through
:class:`Validators`.
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from typing import Any, Protocol

from gossamer.dht.errors import InvalidKey, InvalidRecord, RecordTooLarge
from gossamer.node import Identity, ProtocolError, public_key_from_peer_id, verify_signature, wire

KEY_PREFIX = "/gossamer/"
MAX_KEY_BYTES = 512
MAX_SUBKEY_BYTES = 256
MAX_RECORD_BYTES = 64 * 1024  # one encoded entry: value plus its metadata
MAX_TTL_S = 7 * 24 * 3600.0
MAX_CLOCK_SKEW_S = 300.0
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_SIGNING_DOMAIN = "gossamer/dht/record/1"
VERIFIED_CACHE_SIZE = 8192


@dataclass(frozen=True)
class Entry:
    """One sub-key's value as it travels and is stored.  ``value`` is msgpack bytes."""

    subkey: str
    value: bytes
    ts: float
    expires_at: float
    signer: str = ""
    sig: bytes = b""

    def encode(self) -> bytes:
        return wire.pack([self.subkey, self.value, self.ts, self.expires_at, self.signer, self.sig])

    def order(self) -> tuple[float, float, bytes, str, bytes]:
        """The total order that decides which of two versions of a sub-key wins."""
        return (self.ts, self.expires_at, self.value, self.signer, self.sig)

    def decoded_value(self) -> Any:
        return wire.unpack(self.value)


def decode_entry(blob: Any) -> Entry:
    """Parse an encoded entry received from a peer; InvalidRecord if malformed."""
    if not isinstance(blob, bytes):
        raise InvalidRecord("an entry must be bytes", "bad_entry")
    if len(blob) > MAX_RECORD_BYTES:
        raise RecordTooLarge(
            f"record of {len(blob)} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes"
        )
    try:
        fields = wire.unpack(blob, max_container=16)
    except ProtocolError as exc:
        raise InvalidRecord(f"entry is not valid msgpack: {exc}", "bad_entry") from None
    if not isinstance(fields, list) or len(fields) != 6:
        raise InvalidRecord("an entry is a list of 6 fields", "bad_entry")
    subkey, value, ts, expires_at, signer, sig = fields
    if not isinstance(subkey, str) or not isinstance(signer, str):
        raise InvalidRecord("sub-key and signer must be strings", "bad_entry")
    if not isinstance(value, bytes) or not isinstance(sig, bytes):
        raise InvalidRecord("value and signature must be bytes", "bad_entry")
    for name, number in (("timestamp", ts), ("expiry", expires_at)):
        if (
            not isinstance(number, int | float)
            or isinstance(number, bool)
            or not math.isfinite(number)
        ):
            raise InvalidRecord(f"{name} must be a finite number", "bad_entry")
    return Entry(subkey, value, float(ts), float(expires_at), signer, sig)


# ------------------------------------------------------------------------- keys


def check_key(key: Any) -> str:
    """Return the key's kind (namespace); InvalidKey unless ``/gossamer/<kind>/<rest>``."""
    if not isinstance(key, str):
        raise InvalidKey("a DHT key must be a string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"DHT key longer than {MAX_KEY_BYTES} bytes")
    if not key.startswith(KEY_PREFIX):
        raise InvalidKey(f"DHT keys are namespaced: {KEY_PREFIX}<kind>/<name>, got {key[:80]!r}")
    kind, sep, rest = key[len(KEY_PREFIX) :].partition("/")
    if not _KIND.match(kind) or not sep or not rest:
        raise InvalidKey(
            f"DHT keys look like {KEY_PREFIX}<kind>/<name> with a lowercase kind, got {key[:80]!r}"
        )
    if any(ord(c) < 32 for c in key):
        raise InvalidKey("DHT keys may not contain control characters")
    return kind


PROVIDERS_KIND = "providers"
PEER_KIND = "peer"


def provider_key(content_id: str) -> str:
    if not isinstance(content_id, str) or not content_id or "/" in content_id:
        raise InvalidKey("a content id is a non-empty string without '/'")
    return f"/gossamer/{PROVIDERS_KIND}/{content_id}"


def peer_record_key(peer_id: str) -> str:
    return f"/gossamer/{PEER_KIND}/{peer_id}"


def check_subkey(subkey: Any) -> str:
    if not isinstance(subkey, str):
        raise InvalidKey("a sub-key must be a string")
    if len(subkey.encode("utf-8", "surrogatepass")) > MAX_SUBKEY_BYTES:
        raise InvalidKey(f"sub-key longer than {MAX_SUBKEY_BYTES} bytes")
    return subkey


@functools.lru_cache(maxsize=4096)
def is_peer_id(text: str) -> bool:
    """True when ``text`` is an Ed25519 libp2p peer id (which names its owner's key)."""
    if not 46 <= len(text) <= 60 or not text.startswith("12D3KooW"):
        return False
    try:
        public_key_from_peer_id(text)
    except ValueError:
        return False
    return True


def owner_of(key: str, subkey: str) -> str | None:
    """The peer whose signature an entry needs, or None when anyone may write it."""
    for segment in key[len(KEY_PREFIX) :].split("/")[1:]:
        if is_peer_id(segment):
            return segment
    if subkey and is_peer_id(subkey):
        return subkey
    return None


# ---------------------------------------------------------------------- signing


def signing_bytes(key: str, entry: Entry) -> bytes:
    return wire.pack([_SIGNING_DOMAIN, key, entry.subkey, entry.value, entry.ts, entry.expires_at])


class Signer(Protocol):
    """What signs entries: an :class:`Identity`, or anything with its two members."""

    @property
    def peer_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def make_entry(
    key: str,
    value: Any,
    *,
    ts: float,
    expires_at: float,
    subkey: str = "",
    identity: Identity | Signer | None = None,
) -> Entry:
    """Build (and sign, when ``identity`` is given) the entry a writer publishes."""
    check_key(key)
    check_subkey(subkey)
    try:
        packed = wire.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRecord(f"value is not msgpack-encodable: {exc}", "bad_value") from None
    entry = Entry(subkey, packed, float(ts), float(expires_at))
    if identity is not None:
        signer = identity.peer_id
        sig = identity.sign(signing_bytes(key, entry))
        entry = Entry(subkey, packed, entry.ts, entry.expires_at, signer, sig)
    size = len(entry.encode())
    if size > MAX_RECORD_BYTES:
        raise RecordTooLarge(
            f"record {key}{'#' + subkey if subkey else ''} is {size} bytes encoded; "
            f"the limit is {MAX_RECORD_BYTES} bytes"
        )
    return entry


# ------------------------------------------------------------------- validation


class Validator(Protocol):
    """A namespace-specific check: raise InvalidRecord to refuse an entry."""

    def validate(self, key: str, entry: Entry) -> None: ...


class Validators:
    """Built-in checks for every record plus pluggable ones per namespace (kind)."""

    def __init__(
        self,
        *,
        max_ttl_s: float = MAX_TTL_S,
        max_clock_skew_s: float = MAX_CLOCK_SKEW_S,
    ) -> None:
        self._by_kind: dict[str, list[Validator]] = {}
        self.max_ttl_s = max_ttl_s
        self.max_clock_skew_s = max_clock_skew_s
        # Signatures already checked (the same entry comes back from every
        # replica and with every republish): verifying costs ~100 µs each.
        self._verified: OrderedDict[tuple[Any, ...], None] = OrderedDict()

    def register(self, kind: str, validator: Validator | Callable[[str, Entry], None]) -> None:
        """Add a check for keys ``/gossamer/<kind>/...`` (an object with
        ``validate(key, entry)`` or a plain function of the same arguments)."""
        if not _KIND.match(kind):
            raise InvalidKey(f"namespace kind {kind!r} is not valid")
        if not hasattr(validator, "validate"):
            validator = _FunctionValidator(validator)  # type: ignore[arg-type]
        self._by_kind.setdefault(kind, []).append(validator)  # type: ignore[arg-type]

    def validate(self, key: str, entry: Entry, now: float) -> None:
        """Raise InvalidKey / InvalidRecord unless ``entry`` may be stored under ``key``."""
        kind = check_key(key)
        check_subkey(entry.subkey)
        if entry.expires_at <= now:
            raise InvalidRecord(f"record {key} expired at {entry.expires_at:.3f}", "expired")
        if entry.expires_at > now + self.max_ttl_s + self.max_clock_skew_s:
            raise InvalidRecord(
                f"record {key} expires more than {self.max_ttl_s:.0f} s from now", "ttl"
            )
        if entry.ts > now + self.max_clock_skew_s:
            raise InvalidRecord(f"record {key} is timestamped in the future", "clock")
        if len(entry.value) + len(entry.sig) + 64 > MAX_RECORD_BYTES:
            size = len(entry.encode())
            if size > MAX_RECORD_BYTES:
                raise RecordTooLarge(
                    f"record of {size} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes"
                )
        try:
            wire.unpack(entry.value)
        except ProtocolError as exc:
            raise InvalidRecord(f"value is not valid msgpack: {exc}", "bad_value") from None
        owner = owner_of(key, entry.subkey)
        if owner is not None and entry.signer != owner:
            raise InvalidRecord(
                f"{key} {'#' + entry.subkey if entry.subkey else ''} belongs to {owner[-8:]} "
                f"and must be signed by it",
                "not_owner",
            )
        if (entry.signer or entry.sig) and not self._known_good(key, entry):
            try:
                public_key = public_key_from_peer_id(entry.signer)
            except ValueError:
                raise InvalidRecord("signer is not an Ed25519 peer id", "bad_signature") from None
            if not verify_signature(public_key, entry.sig, signing_bytes(key, entry)):
                raise InvalidRecord(f"signature on {key} does not verify", "bad_signature")
            self.trust(key, entry)
        for validator in self._by_kind.get(kind, ()):
            validator.validate(key, entry)

    def trust(self, key: str, entry: Entry) -> None:
        """Remember that ``entry``'s signature is good (we verified or made it)."""
        self._verified[(key, *astuple(entry))] = None
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)

    def _known_good(self, key: str, entry: Entry) -> bool:
        slot = (key, *astuple(entry))
        if slot in self._verified:
            self._verified.move_to_end(slot)
            return True
        return False


@dataclass(frozen=True)
class _FunctionValidator:
    func: Callable[[str, Entry], None]

    def validate(self, key: str, entry: Entry) -> None:
        self.func(key, entry)


# ---------------------------------------------------------------------- merging


def newer(a: Entry, b: Entry) -> Entry:
    """The version of one sub-key that every replica keeps."""
    return a if a.order() >= b.order() else b


def merge(entries: Iterable[Entry], now: float) -> dict[str, Entry]:
    """Newest entry per sub-key, leaving out expired ones (inputs already validated)."""
    out: dict[str, Entry] = {}
    for entry in entries:
        if entry.expires_at <= now:
            continue
        current = out.get(entry.subkey)
        out[entry.subkey] = entry if current is None else newer(current, entry)
    return out


# ----------------------------------------------------------------- what get returns


@dataclass(frozen=True)
class Item:
    """One sub-key's value as ``get`` returns it."""

    value: Any
    expires_at: float
    updated_at: float
    signer: str | None


@dataclass(frozen=True)
class Record:
    """What ``get(key)`` found: the plain value and/or sub-keys, each with its expiry."""

    key: str
    items: dict[str, Item]

    @property
    def value(self) -> Any:
        """The plain value (``put`` without a sub-key), or None."""
        item = self.items.get("")
        return None if item is None else item.value

    @property
    def expires_at(self) -> float:
        """Expiry of the plain value, or the latest sub-key expiry."""
        item = self.items.get("")
        if item is not None:
            return item.expires_at
        return max((i.expires_at for i in self.items.values()), default=0.0)

    @property
    def subkeys(self) -> dict[str, Item]:
        return {k: v for k, v in self.items.items() if k}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (bytes become hex strings) for the CLI."""

        def plain(value: Any) -> Any:
            if isinstance(value, bytes):
                return {"hex": value.hex()}
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        out: dict[str, Any] = {"key": self.key}
        if "" in self.items:
            out["value"] = plain(self.items[""].value)
            out["expires_at"] = self.items[""].expires_at
        if self.subkeys:
            out["subkeys"] = {
                k: {"value": plain(i.value), "expires_at": i.expires_at, "signer": i.signer}
                for k, i in sorted(self.subkeys.items())
            }
        return out


def to_record(key: str, entries: dict[str, Entry]) -> Record | None:
    if not entries:
        return None
    items = {
        subkey: Item(entry.decoded_value(), entry.expires_at, entry.ts, entry.signer or None)
        for subkey, entry in sorted(entries.items())
    }
    return Record(key, items)
