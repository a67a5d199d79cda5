"""The DHT's RPC service (``/gossamer/dht/1.0.0``) and the checks on what peers send.

Methods, all small msgpack maps over the node's RPC layer:

- ``hello(addrs)`` → ``{"addrs"}``: two peers swap listen addresses; both
  enter each other's routing table.  Sent by the dialer of every connection.
- ``find_node(target)`` → ``{"peers": [[peer_id, [addr, ...]], ...]}``: the k
  contacts nearest the 32-byte ``target``.
- ``find_value(key)`` → ``{"entries": [entry, ...], "peers": [...]}``: what we
  store under ``key`` plus the k contacts nearest it.
- ``store(key, entries)`` → ``{"stored": n, "peers": [...]}``: keep entries
  (each validated; any invalid one refuses the whole request with a typed
  code) and name the k contacts nearest the key, so a store doubles as a
  lookup step.

Everything from the network is checked here before the DHT sees it; the
handlers never trust a field they did not check.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any

from gossamer.dht._records import MAX_RECORD_BYTES, check_key, decode_entry, is_peer_id
from gossamer.dht.errors import DHTError, InvalidRecord
from gossamer.node import CallContext, ConfigError, Refused, Service
from gossamer.node.rpc import rpc

if TYPE_CHECKING:
    from gossamer.dht._dht import DHT

log = logging.getLogger(__name__)

MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_CONTACTS = 64
MAX_ENTRIES_PER_STORE = 1024
_UNSPECIFIED = re.compile(r"^/ip4/0\.0\.0\.0/|^/ip6/::/")
_REMOTE_IP = re.compile(r"^/(ip4|ip6)/([^/]+)/")


@functools.lru_cache(maxsize=8192)
def _valid_multiaddr(text: str) -> bool:
    from gossamer.node import parse_multiaddr

    try:
        parse_multiaddr(text)
    except ConfigError:
        return False
    return True


def clean_addrs(peer_id: str, raw: Any, observed: str = "") -> tuple[str, ...]:
    """Checked listen addresses of ``peer_id``, each ending in /p2p/<peer_id>.

    Drops anything malformed or naming another peer; replaces an unspecified
    host (0.0.0.0, ::) with the IP we observe the peer at, when we know it.
    """
    if not isinstance(raw, list):
        return ()
    out: list[str] = []
    suffix = f"/p2p/{peer_id}"
    for addr in raw[:MAX_ADDRS]:
        if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > MAX_ADDR_LEN:
            continue
        if "/p2p/" in addr.replace("/p2p-circuit", ""):
            # The last /p2p/ component must be the peer itself (relayed addrs keep theirs).
            if not addr.endswith(suffix):
                continue
        else:
            addr += suffix
        if _UNSPECIFIED.match(addr):
            match = _REMOTE_IP.match(observed)
            if match is None:
                continue
            addr = f"/{match.group(1)}/{match.group(2)}/" + addr.split("/", 3)[3]
        if _valid_multiaddr(addr) and addr not in out:
            out.append(addr)
    return tuple(out)


def parse_contacts(raw: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Contacts a peer returned: ``[[peer_id, [addrs]], ...]``, malformed ones dropped."""
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:MAX_CONTACTS]:
        if not isinstance(item, list) or len(item) != 2:
            continue
        peer_id, addrs = item
        if not isinstance(peer_id, str) or not is_peer_id(peer_id):
            continue
        out.append((peer_id, clean_addrs(peer_id, addrs)))
    return out


def encode_contacts(contacts: Any) -> list[list[Any]]:
    """Contacts as they travel; those without an address are of no use to a stranger."""
    return [[c.peer_id, list(c.addrs)] for c in contacts if c.addrs]


class DHTService(Service):
    name = "dht"
    version = "1.0.0"
    # one store carries at most a key's worth of entries (1 MiB) plus framing
    max_request_bytes = 2 << 20
    max_response_bytes = 2 << 20

    def __init__(self, dht: DHT) -> None:
        self._dht = dht

    @rpc
    async def hello(self, ctx: CallContext, addrs: list) -> dict[str, Any]:
        self._dht.on_hello(ctx.peer_id, addrs)
        return {"addrs": self._dht.hello_addrs()}

    @rpc
    async def find_node(self, ctx: CallContext, target: bytes) -> dict[str, Any]:
        if len(target) != 32:
            raise Refused("target must be 32 bytes", "bad_request")
        self._dht.note_caller(ctx.peer_id)
        contacts = self._dht.table.closest(int.from_bytes(target, "big"), exclude=ctx.peer_id)
        return {"peers": encode_contacts(contacts)}

    @rpc
    async def find_value(self, ctx: CallContext, key: str) -> dict[str, Any]:
        try:
            check_key(key)
        except DHTError as exc:
            raise Refused(str(exc), "bad_key") from None
        self._dht.note_caller(ctx.peer_id)
        entries, contacts = self._dht.serve_find_value(key, ctx.peer_id)
        return {"entries": [e.encode() for e in entries], "peers": encode_contacts(contacts)}

    @rpc
    async def store(self, ctx: CallContext, key: str, entries: list) -> dict[str, Any]:
        if not entries or len(entries) > MAX_ENTRIES_PER_STORE:
            raise Refused(f"a store carries 1 to {MAX_ENTRIES_PER_STORE} entries", "bad_request")
        try:
            check_key(key)
            decoded = [decode_entry(blob) for blob in entries]
        except InvalidRecord as exc:
            raise Refused(exc.message, exc.code) from None
        except DHTError as exc:
            raise Refused(str(exc), "bad_key") from None
        self._dht.note_caller(ctx.peer_id)
        try:
            contacts = self._dht.serve_store(key, decoded, ctx.peer_id)
        except InvalidRecord as exc:
            # The sender gets the typed reason; here it is debug noise at most.
            log.debug("refused a record for %s from %s: %s", key[:80], ctx.peer_id[-8:], exc)
            raise Refused(exc.message, exc.code) from None
        except DHTError as exc:
            raise Refused(str(exc), "bad_key") from None
        return {"stored": len(decoded), "peers": encode_contacts(contacts)}


__all__ = ["MAX_RECORD_BYTES", "DHTService", "clean_addrs", "encode_contacts", "parse_contacts"]
