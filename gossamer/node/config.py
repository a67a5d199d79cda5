"""Node configuration: defaults < one TOML file < ``GOSSAMER_*`` environment < CLI flags.

Every field has a default that works on a laptop.  Unknown keys in the TOML
file or malformed values raise :class:`ConfigError` with a one-line message
that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossamer.node.errors import ConfigError
from gossamer.node.shaper import LinkShape
from gossamer.node.tables import field_types, typed_fields

ENV_PREFIX = "GOSSAMER_"


def default_data_dir() -> Path:
    if home := os.environ.get("GOSSAMER_HOME"):
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "gossamer"


@dataclass
class NodeConfig:
    """Everything a node needs to start.  Field docs double as ``--help`` text."""

    data_dir: Path = field(default_factory=default_data_dir)
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)

    # connection management
    max_connections: int = 256
    # admission of inbound connections (node/admission.py)
    handshake_timeout: float = 5.0  # Noise + yamux must finish within this
    admission_handshakes_per_ip: int = 8
    admission_handshakes_per_subnet: int = 32  # /24 (IPv4) or /64 (IPv6)
    admission_handshakes_total: int = 128
    admission_connections_per_ip: int = 32
    admission_evict_idle_after: float = 30.0  # a full node evicts a stranger idle this long
    admission_full_ip_handshake_every: float = 1.0  # an address at its cap: one handshake per
    admission_exempt_loopback: bool = True  # local test swarms are not strangers
    # a peer that keeps misbehaving is disconnected and refused (node/complaints.py)
    misbehaviour_ban_score: float = 100.0
    misbehaviour_ban_seconds: float = 60.0  # doubles per repeat, up to an hour; 0: never ban
    misbehaviour_exempt_loopback: bool = True  # never ban local test peers by accident
    max_connections_per_peer: int = 1
    max_concurrent_dials: int = 16
    dial_timeout: float = 10.0
    bootstrap_backoff_min: float = 0.5
    bootstrap_backoff_max: float = 60.0
    ping_interval: float = 30.0

    # rpc
    rpc_max_request_bytes: int = 1 << 20
    rpc_max_response_bytes: int = 16 << 20
    rpc_default_timeout: float = 10.0
    rpc_max_concurrent_streams_per_peer: int = 64
    rpc_max_concurrent_streams: int = 1024  # from all peers together

    # tensor data plane
    dataplane_listen: str = "0.0.0.0:0"
    dataplane_announce: str = ""
    dataplane_direct: bool = True
    dataplane_chunk_bytes: int = 4 << 20
    dataplane_max_message_bytes: int = 32 << 30
    dataplane_unsolicited_budget_bytes: int = 1 << 30
    dataplane_unsolicited_budget_per_peer_bytes: int = 256 << 20  # one sender's share of it
    dataplane_unsolicited_timeout: float = 30.0
    dataplane_max_channels_per_peer: int = 4  # inbound channels one peer may hold open
    dataplane_max_channels: int = 512  # inbound channels from all peers together

    # NAT traversal (see gossamer/node/reachability.py, relay.py, holepunch.py, upnp.py)
    reachability: str = "auto"  # auto (dial-back decides) | public | private
    autonat: bool = True  # ask peers to dial us back, and dial back for them
    autonat_confirmations: int = 2  # agreeing helpers (or all there are) to decide
    autonat_timeout: float = 5.0  # one dial-back: TCP connect + Noise handshake
    autonat_delay: float = 1.0  # after the first connection, before the first check
    autonat_retry: float = 15.0  # re-check interval while unknown
    autonat_interval: float = 600.0  # re-check interval once decided
    relay_service: str = "auto"  # serve as circuit relay v2 hop: auto (when public) | on | off
    relay_max_reservations: int = 128
    relay_max_circuits: int = 16  # concurrent circuits per reserved peer
    relay_circuit_duration: float = 120.0  # seconds one relayed connection may last
    relay_circuit_bytes: int = 1 << 27  # bytes one relayed connection may carry
    relay_reservation_ttl: float = 900.0
    relay_client: bool = True  # when private, hold reservations on public relays
    relay_reservations: int = 2  # how many relays to hold reservations with
    relays: list[str] = field(default_factory=list)  # relay candidates besides bootstrap/DHT
    relay_check_interval: float = 10.0  # ping reserved relays; re-reserve when one is gone
    holepunch: bool = True  # DCUtR: upgrade relayed connections to direct ones
    holepunch_attempts: int = 3
    holepunch_timeout: float = 5.0  # one attempt's dials
    # what a peer can make us dial (DCUtR answers), per minute; see node/holepunch.py
    holepunch_sessions_per_peer: int = 3
    holepunch_sessions_per_minute: int = 60  # from all peers together
    holepunch_max_connects: int = 256  # TCP connects one session may make, re-dials included
    holepunch_relay_grace: float = 3.0  # keep the relayed connection this long after upgrade
    upnp: bool = True  # when private: ask a UPnP gateway for a port mapping (verified first)
    upnp_timeout: float = 3.0

    # daemon control API (always bound to 127.0.0.1)
    control_port: int = 0

    # discovery that sends multicast: off unless asked for
    mdns: bool = False

    log_level: str = "info"

    # the node's access link, emulated in user space ([node.shape] or GOSSAMER_SHAPE; see
    # node/shaper.py); empty: not shaped.  Not a plain key: a table of its own.
    shape: LinkShape = field(default_factory=LinkShape)

    # the config file's other tables ([dht], ...), for the layers above to read; not a key
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    def identity_path(self) -> Path:
        return self.data_dir / "identity.key"

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


_NOT_KEYS = ("tables", "shape")
_FIELD_TYPES = {k: v for k, v in field_types(NodeConfig).items() if k not in _NOT_KEYS}


def _apply(config: NodeConfig, values: Mapping[str, Any], source: str, from_text: bool) -> None:
    values = dict(values)
    if "shape" in values:
        config.shape = _shape(values.pop("shape"), source, from_text)
    for name, value in typed_fields(
        NodeConfig, values, source, from_text=from_text, skip=_NOT_KEYS
    ).items():
        setattr(config, name, value)


def _shape(value: Any, source: str, from_text: bool) -> LinkShape:
    if isinstance(value, LinkShape):
        return value
    if isinstance(value, str) and from_text:
        return LinkShape.parse(value, f"shape in {source}")
    if isinstance(value, Mapping):
        return LinkShape.from_table(value, f"[node.shape] in {source}")
    raise ConfigError(f"config key 'shape' expects a table (in {source}), got {value!r}")


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build a config from defaults, then ``path`` (TOML), then env, then ``overrides``.

    The TOML file may hold the keys at top level or under a ``[node]`` table.
    ``overrides`` are typed values (from CLI flags); ``None`` values are skipped
    so unset flags do not clobber the file.
    """
    config = NodeConfig()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        node_table = data.pop("node", {})
        if not isinstance(node_table, dict):
            raise ConfigError(f"[node] in {path} must be a table")
        # other tables ([run], [dht], ...) belong to other layers
        config.tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        if "shape" in config.tables:
            raise ConfigError(f"{path}: the link shape belongs under [node.shape]")
        top_level = {k: v for k, v in data.items() if not isinstance(v, dict)}
        _apply(config, top_level, str(path), from_text=False)
        _apply(config, node_table, f"{path} [node]", from_text=False)
    env = os.environ if env is None else env
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in (*_FIELD_TYPES, "shape")
    }
    _apply(config, from_env, "the environment", from_text=True)
    if overrides:
        _apply(
            config,
            {k: v for k, v in overrides.items() if v is not None},
            "the command line",
            from_text=True,
        )
    validate(config)
    return config


def validate(config: NodeConfig) -> None:
    """Reject values that would make the node misbehave rather than fail loudly."""
    positive_ints = (
        "max_connections",
        "max_connections_per_peer",
        "max_concurrent_dials",
        "rpc_max_request_bytes",
        "rpc_max_response_bytes",
        "rpc_max_concurrent_streams_per_peer",
        "rpc_max_concurrent_streams",
        "dataplane_chunk_bytes",
        "dataplane_max_message_bytes",
        "dataplane_max_channels_per_peer",
        "dataplane_unsolicited_budget_per_peer_bytes",
        "admission_handshakes_per_ip",
        "admission_handshakes_per_subnet",
        "admission_handshakes_total",
        "admission_connections_per_ip",
        "dataplane_max_channels",
    )
    for name in positive_ints:
        if getattr(config, name) <= 0:
            raise ConfigError(f"config key {name!r} must be positive")
    for name in (
        "dial_timeout",
        "rpc_default_timeout",
        "bootstrap_backoff_min",
        "handshake_timeout",
        "admission_full_ip_handshake_every",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"config key {name!r} must be positive")
    for name in (
        "autonat_confirmations",
        "autonat_timeout",
        "autonat_retry",
        "autonat_interval",
        "relay_max_reservations",
        "relay_max_circuits",
        "relay_circuit_duration",
        "relay_circuit_bytes",
        "relay_reservation_ttl",
        "relay_check_interval",
        "holepunch_attempts",
        "holepunch_timeout",
        "holepunch_sessions_per_peer",
        "holepunch_sessions_per_minute",
        "holepunch_max_connects",
        "upnp_timeout",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"config key {name!r} must be positive")
    for name in ("autonat_delay", "holepunch_relay_grace", "relay_reservations"):
        if getattr(config, name) < 0:
            raise ConfigError(f"config key {name!r} must not be negative")
    choices = {
        "reachability": ("auto", "public", "private"),
        "relay_service": ("auto", "on", "off"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"config key {name!r} must be one of {', '.join(allowed)}")
    if not 0 <= config.control_port < 65536:
        raise ConfigError("config key 'control_port' must be a TCP port (0 = any)")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("config key 'log_level' must be debug, info, warning or error")
    from gossamer.node.addresses import parse_host_port, parse_multiaddr

    for name in ("listen", "announce", "bootstrap", "relays"):
        for addr in getattr(config, name):
            parse_multiaddr(
                addr, what=f"{name} address", need_peer_id=name in ("bootstrap", "relays")
            )
    if not config.listen:
        raise ConfigError("config key 'listen' needs at least one address")
    parse_host_port(config.dataplane_listen, what="dataplane_listen")
    if config.dataplane_announce:
        parse_host_port(config.dataplane_announce, what="dataplane_announce")
