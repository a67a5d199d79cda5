"""A strict decoder for Yjs/yrs v1 update bytes — what an update touches, before it is applied.

pycrdt has no way to say which keys an update writes before it writes them, and
no way to roll an update back, so the run document reads the update itself.
The format (lib0 encoding, ``Y.encodeStateAsUpdate`` v1) is::

    update      = structs delete_set
    structs     = varuint(n_clients) { varuint(n_structs) varuint(client) varuint(clock) struct* }
    struct      = info:u8 ...    (info & 0x1f: 0 = GC, 10 = Skip, else an Item's content ref)
    item        = [left origin: client clock if info & 0x80]
                  [right origin: client clock if info & 0x40]
                  [parent + parent_sub, only when neither origin is present:
                     varuint(1) string(root name) | varuint(0) client clock;
                     string(key) if info & 0x20]
                  content
    delete_set  = varuint(n) { varuint(client) varuint(n_ranges) { varuint(clock) varuint(len) } }

The run document uses a deliberately small subset of it (named root maps whose
values are single binary blobs), and this decoder accepts only that subset:
content is ``Any`` holding exactly one ``Uint8Array`` (tag 116) or ``Deleted``;
no GC or Skip structs, no right origins, no nested types, no text.  Anything
else is refused with :class:`UpdateFormatError` — a reader that understands
less than yrs must not guess what yrs would do with the rest.

Pure functions, no pycrdt import: the permission rules and the tests use it
without a document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SAFE = (1 << 53) - 1  # lib0 numbers are JavaScript-safe integers
MAX_STRING = 1024  # root names and keys; our keys are far shorter

# Item content references (info & 0x1f)
GC = 0
DELETED = 1
JSON = 2
BINARY = 3
STRING = 4
EMBED = 5
FORMAT = 6
TYPE = 7
ANY = 8
DOC = 9
SKIP = 10

ANY_UINT8ARRAY = 116

HAS_ORIGIN = 0x80
HAS_RIGHT_ORIGIN = 0x40
HAS_PARENT_SUB = 0x20


class UpdateFormatError(ValueError):
    """The bytes are not a v1 update in the subset the run document accepts."""


@dataclass(slots=True)
class Item:
    """One item struct of an update (a map entry, live or deleted)."""

    client: int
    clock: int
    length: int
    deleted: bool
    origin: tuple[int, int] | None
    root: str | None  # parent root name, when the parent is written explicitly
    key: str | None  # parent_sub, when written explicitly
    value: bytes | None  # the Uint8Array of a live entry


@dataclass(slots=True)
class Update:
    items: list[Item] = field(default_factory=list)
    # client -> list of (clock, length)
    deletes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # client -> (first clock, end clock) of its structs in this update
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    structs_end: int = 0  # byte offset where the delete set starts


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise UpdateFormatError("update ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varuint(self) -> int:
        data, pos, end = self.data, self.pos, len(self.data)
        value = 0
        shift = 0
        while True:
            if pos >= end:
                raise UpdateFormatError("update ends inside a number")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 56:
                raise UpdateFormatError("number longer than 8 bytes")
        if value > MAX_SAFE:
            raise UpdateFormatError("number larger than 2**53")
        self.pos = pos
        return value

    def raw(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise UpdateFormatError("update ends inside a byte string")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def string(self) -> str:
        n = self.varuint()
        if n > MAX_STRING:
            raise UpdateFormatError(f"string of {n} bytes (limit {MAX_STRING})")
        try:
            return self.raw(n).decode("utf-8")
        except UnicodeDecodeError:
            raise UpdateFormatError("string is not UTF-8") from None

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def decode(update: bytes | bytearray | memoryview, *, max_items: int = 1_000_000) -> Update:
    """Decode ``update``; raise UpdateFormatError unless it is in the accepted subset."""
    r = _Reader(update)
    out = Update()
    n_clients = r.varuint()
    if n_clients > 1024:
        raise UpdateFormatError(f"{n_clients} clients in one update")
    total = 0
    for _ in range(n_clients):
        n_structs = r.varuint()
        client = r.varuint()
        clock = r.varuint()
        if client in out.ranges:
            raise UpdateFormatError(f"client {client} appears twice")
        if n_structs == 0:
            raise UpdateFormatError("empty struct list")
        total += n_structs
        if total > max_items:
            raise UpdateFormatError(f"more than {max_items} structs")
        start = clock
        for _ in range(n_structs):
            item = _read_item(r, client, clock)
            out.items.append(item)
            clock += item.length
            if clock > MAX_SAFE:
                raise UpdateFormatError("clock overflow")
        out.ranges[client] = (start, clock)
    out.structs_end = r.pos
    n_del = r.varuint()
    if n_del > 1024:
        raise UpdateFormatError(f"{n_del} clients in the delete set")
    for _ in range(n_del):
        client = r.varuint()
        n_ranges = r.varuint()
        if client in out.deletes:
            raise UpdateFormatError(f"client {client} appears twice in the delete set")
        if n_ranges > max_items:
            raise UpdateFormatError("too many delete ranges")
        ranges = []
        for _ in range(n_ranges):
            clock = r.varuint()
            length = r.varuint()
            if length == 0 or clock + length > MAX_SAFE:
                raise UpdateFormatError("bad delete range")
            ranges.append((clock, length))
        out.deletes[client] = ranges
    if not r.at_end():
        raise UpdateFormatError(f"{len(r.data) - r.pos} trailing bytes after the delete set")
    return out


def _read_item(r: _Reader, client: int, clock: int) -> Item:
    info = r.u8()
    ref = info & 0x1F
    if ref in (GC, SKIP):
        raise UpdateFormatError("GC and Skip structs are not accepted")
    if info & HAS_RIGHT_ORIGIN:
        raise UpdateFormatError("right origins are not used by the run document")
    origin = None
    root = key = None
    if info & HAS_ORIGIN:
        origin = (r.varuint(), r.varuint())
    else:
        if r.varuint() != 1:
            raise UpdateFormatError("nested parents are not used by the run document")
        root = r.string()
        if not info & HAS_PARENT_SUB:
            raise UpdateFormatError("a root item without a key")
        key = r.string()
    if ref == ANY:
        count = r.varuint()
        if count != 1:
            raise UpdateFormatError(f"an Any item with {count} values")
        if r.u8() != ANY_UINT8ARRAY:
            raise UpdateFormatError("values must be byte strings")
        value = r.raw(r.varuint())
        return Item(client, clock, 1, False, origin, root, key, value)
    if ref == DELETED:
        length = r.varuint()
        if length == 0:
            raise UpdateFormatError("a deleted item of length 0")
        return Item(client, clock, length, True, origin, root, key, None)
    raise UpdateFormatError(f"content type {ref} is not used by the run document")


# ------------------------------------------------------------------ encoding


def _varuint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_state_vector(sv: dict[int, int]) -> bytes:
    """lib0 state vector bytes, as ``Doc.get_update(state)`` takes them."""
    out = bytearray(_varuint(len(sv)))
    for client, clock in sorted(sv.items(), reverse=True):
        out += _varuint(client) + _varuint(clock)
    return bytes(out)


def decode_state_vector(data: bytes) -> dict[int, int]:
    r = _Reader(data)
    n = r.varuint()
    out = {}
    for _ in range(n):
        client = r.varuint()
        out[client] = r.varuint()
    if not r.at_end():
        raise UpdateFormatError("trailing bytes after a state vector")
    return out


def encode_delete_set(deletes: dict[int, list[tuple[int, int]]]) -> bytes:
    out = bytearray(_varuint(len(deletes)))
    for client, ranges in sorted(deletes.items(), reverse=True):
        out += _varuint(client) + _varuint(len(ranges))
        for clock, length in ranges:
            out += _varuint(clock) + _varuint(length)
    return bytes(out)


def restrict_delete_set(update: bytes, client: int) -> bytes:
    """``update`` with its delete set cut down to ``client``'s own ranges.

    ``Doc.get_update(state)`` appends the document's whole delete set; an
    author may only sign deletions of its own items.
    """
    decoded = decode(update)
    mine = {client: decoded.deletes[client]} if client in decoded.deletes else {}
    return bytes(update[: decoded.structs_end]) + encode_delete_set(mine)
