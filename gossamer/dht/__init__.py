"""DHT layer: signed, expiring, sub-keyed records and providers over the node.

Attach one to a running node::

    from gossamer.dht import DHT, DHTConfig

    async with Node(config) as node:
        dht = await DHT.start(node)          # also node.service(DHT) is dht
        await node.connect(bootstrap_addr)   # the routing table fills by itself
        await dht.put("/gossamer/run/r1", {"lr": 0.7}, time.time() + 600)
        record = await dht.get("/gossamer/run/r1")   # Record | None; record.value

Keys are ``/gossamer/<kind>/<name>``.  ``put(key, value, expires_at, subkey=None)``
stores any msgpack-encodable value; with ``subkey`` each writer keeps its own
entry under one key and replicas merge them (newest per sub-key wins).  A key
with a peer-id segment, or a sub-key that is a peer id, can only be written by
that peer (records are signed with the node key).  ``provide(cid)`` /
``find_providers(cid)`` announce and find content; ``find_peer(peer_id)`` finds
a peer's addresses.  Records persist under ``<data_dir>/dht.sqlite3``.
"""

from gossamer.dht._config import DHTConfig
from gossamer.dht._dht import DHT, attach
from gossamer.dht._records import (
    MAX_RECORD_BYTES,
    Entry,
    Item,
    Record,
    Validator,
    Validators,
    owner_of,
    peer_record_key,
    provider_key,
)
from gossamer.dht._store import StoreLimits
from gossamer.dht.errors import (
    DHTError,
    InvalidKey,
    InvalidRecord,
    QuotaExceeded,
    RecordTooLarge,
    StoreFailed,
)

__all__ = [
    "DHT",
    "MAX_RECORD_BYTES",
    "DHTConfig",
    "DHTError",
    "Entry",
    "InvalidKey",
    "InvalidRecord",
    "Item",
    "QuotaExceeded",
    "Record",
    "RecordTooLarge",
    "StoreFailed",
    "StoreLimits",
    "Validator",
    "Validators",
    "attach",
    "owner_of",
    "peer_record_key",
    "provider_key",
]
