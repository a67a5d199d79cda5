"""The DHT's methods on the node's local control API, for the CLI and scripts.

Each handler checks its parameters and calls the DHT's public API; nothing
here reaches into the DHT's state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gossamer.dht.errors import DHTError

if TYPE_CHECKING:
    from gossamer.dht._dht import DHT


def register_control(dht: DHT) -> None:
    """Serve ``dht.put``, ``dht.get``, ``dht.providers``, ``dht.provide``, ``dht.find_peer``
    and ``dht.status`` on the node's local control API (the CLI's way in)."""

    async def put(params: dict[str, Any]) -> Any:
        key, value = params.get("key"), params.get("value")
        ttl = params.get("ttl", 3600.0)
        subkey = params.get("subkey")
        if not isinstance(key, str) or not isinstance(ttl, int | float) or ttl <= 0:
            raise DHTError("dht.put needs 'key' (string), 'value' and a positive 'ttl'")
        if subkey is not None and not isinstance(subkey, str):
            raise DHTError("dht.put: 'subkey' must be a string")
        stored = await dht.put(key, value, dht.clock() + float(ttl), subkey=subkey)
        return {"key": key, "stored": stored}

    async def get(params: dict[str, Any]) -> Any:
        key = params.get("key")
        if not isinstance(key, str):
            raise DHTError("dht.get needs 'key' (string)")
        record = await dht.get(key, latest=bool(params.get("latest", True)))
        return None if record is None else record.to_dict()

    async def providers(params: dict[str, Any]) -> Any:
        content_id = params.get("content_id")
        if not isinstance(content_id, str):
            raise DHTError("dht.providers needs 'content_id' (string)")
        found = await dht.find_providers(content_id)
        return [
            {"peer_id": p.peer_id, "addrs": list(p.addrs), "expires_at": p.expires_at}
            for p in found
        ]

    async def provide(params: dict[str, Any]) -> Any:
        content_id = params.get("content_id")
        if not isinstance(content_id, str):
            raise DHTError("dht.provide needs 'content_id' (string)")
        return {"content_id": content_id, "stored": await dht.provide(content_id)}

    async def find_peer(params: dict[str, Any]) -> Any:
        peer_id = params.get("peer_id")
        if not isinstance(peer_id, str):
            raise DHTError("dht.find_peer needs 'peer_id' (string)")
        return {"peer_id": peer_id, "addrs": await dht.find_peer(peer_id)}

    async def status(params: dict[str, Any]) -> Any:
        return dht.status()

    for name, handler in (
        ("dht.put", put),
        ("dht.get", get),
        ("dht.providers", providers),
        ("dht.provide", provide),
        ("dht.find_peer", find_peer),
        ("dht.status", status),
    ):
        if name not in dht.node.control_methods:
            dht.node.register_control(name, handler)
