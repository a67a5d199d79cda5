"""Node layer: the libp2p host adapter, identity, RPC, the tensor data plane, NAT traversal,
the daemon.  This is the layer's face: code above it imports these names from ``gossamer.node``
(one name, one path); modules inside the layer import each other directly.  Names load lazily
(``import gossamer.node`` costs nothing until one is used), so the CLI starts fast.
"""

from __future__ import annotations

from gossamer._lazy import lazy_face

_EXPORTS = {
    "Complaints": "gossamer.node.complaints",
    "InFlight": "gossamer.node.budgets",
    "PeerBudget": "gossamer.node.budgets",
    "parse_multiaddr": "gossamer.node.addresses",
    "NodeConfig": "gossamer.node.config",
    "BULK_BYTES": "gossamer.node.dataplane.links",
    "DeadlinePolicy": "gossamer.node.dataplane.links",
    "LinkEstimates": "gossamer.node.dataplane.links",
    "LinkShape": "gossamer.node.shaper",
    "default_data_dir": "gossamer.node.config",
    "load_config": "gossamer.node.config",
    "ControlClient": "gossamer.node.control",
    "ControlError": "gossamer.node.control",
    "NoDaemon": "gossamer.node.control",
    "ConfigError": "gossamer.node.errors",
    "DeadlineExceeded": "gossamer.node.errors",
    "FrameTooLarge": "gossamer.node.errors",
    "GossamerError": "gossamer.node.errors",
    "PeerUnreachable": "gossamer.node.errors",
    "ProtocolError": "gossamer.node.errors",
    "Refused": "gossamer.node.errors",
    "RemoteError": "gossamer.node.errors",
    "TransferError": "gossamer.node.errors",
    "ContentRouting": "gossamer.node.hooks",
    "Provider": "gossamer.node.hooks",
    "Services": "gossamer.node.hooks",
    "Connection": "gossamer.node.host",
    "Host": "gossamer.node.host",
    "Stream": "gossamer.node.host",
    "Identity": "gossamer.node.identity",
    "load_or_create": "gossamer.node.identity",
    "peer_id_from_public_key": "gossamer.node.identity",
    "public_key_from_peer_id": "gossamer.node.identity",
    "verify_signature": "gossamer.node.identity",
    "Node": "gossamer.node.node",
    "CallContext": "gossamer.node.rpc",
    "RpcClient": "gossamer.node.rpc",
    "RpcServer": "gossamer.node.rpc",
    "Service": "gossamer.node.rpc",
    "typed_fields": "gossamer.node.tables",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
