"""Node layer: libp2p host, identity, RPC, tensor data plane, daemon."""
