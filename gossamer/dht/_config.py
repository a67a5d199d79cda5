"""The DHT's tunables, in one dataclass shared by the DHT and its background work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gossamer.dht._store import StoreLimits
from gossamer.node import ConfigError, typed_fields


@dataclass
class DHTConfig:
    """Tunables of the DHT.  Defaults suit a swarm on the internet; tests shrink the intervals."""

    k: int = 20  # bucket size and lookup width
    replicas: int = 20  # how many of the nodes nearest a key store it (at most k)
    alpha: int = 3  # queries in flight per lookup
    get_quorum: int = 3  # get(latest=True) stops once this many replicas answered
    op_timeout: float = 10.0  # default deadline of put/get/provide/find_*
    # Per-call deadline: srtt + 4·rttvar, clamped.  The floor is TCP's minimum
    # RTO (RFC 6298): latency comes from the lookup's stall rule, the deadline
    # only decides that a peer failed, and a loaded machine must not make us
    # evict peers that are merely slow for a moment.
    rpc_timeout_floor: float = 1.0
    rpc_timeout_cap: float = 5.0
    dial_allowance: float = 2.0  # added to a call's deadline when we must dial first
    stall_floor: float = 0.02  # a lookup asks another peer after max(this, srtt + 4·rttvar)
    refresh_interval: float = 600.0  # buckets not looked up this long get a refresh lookup
    republish_interval: float = 600.0  # we re-store our own records this often
    purge_interval: float = 30.0
    flush_interval: float = 0.5  # persistence batching
    provider_ttl: float = 3600.0
    peer_record_ttl: float = 3600.0
    publish_peer_record: bool = True  # keep /gossamer/peer/<our id> -> our addrs in the DHT
    bootstrap_on_join: bool = True  # look ourselves up once the first peer answers
    refresh_buckets_on_join: bool = True
    reconcile_interval: float = 5.0  # greet connected peers missing from the table
    persist: bool = True
    reconnect_saved_contacts: int = 8
    limits: StoreLimits = field(default_factory=StoreLimits)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str = "[dht]") -> DHTConfig:
        """A config from a TOML table (``[dht]``, with ``[dht.limits]``); a mistake is a
        ConfigError that names the key."""
        values = _non_negative(
            typed_fields(
                cls, {k: v for k, v in table.items() if k != "limits"}, source, skip=("limits",)
            ),
            source,
        )
        limits = table.get("limits", {})
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{source}: 'limits' must be a table")
        source_limits = f"{source}.limits"
        values["limits"] = StoreLimits(
            **_non_negative(typed_fields(StoreLimits, limits, source_limits), source_limits)
        )
        config = cls(**values)
        if not 1 <= config.replicas <= config.k or config.alpha < 1 or config.get_quorum < 1:
            raise ConfigError(f"{source}: need 1 <= replicas <= k, alpha >= 1, get_quorum >= 1")
        return config


def _non_negative(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Every count, size and interval of the DHT is >= 0."""
    for name, value in values.items():
        if not isinstance(value, bool) and isinstance(value, int | float) and value < 0:
            raise ConfigError(f"config key {name!r} must not be negative (in {source})")
    return values
