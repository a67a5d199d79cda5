"""gossamer: train models together over a peer-to-peer network.

This module is the SDK surface.  Names are imported lazily so that a node that
only relays or bootstraps never pays for (or needs) torch.
"""

from __future__ import annotations

from gossamer._lazy import lazy_face

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    "Node": "gossamer.node.node:Node",
    "NodeConfig": "gossamer.node.config:NodeConfig",
    "load_config": "gossamer.node.config:load_config",
    "Identity": "gossamer.node.identity:Identity",
    "Service": "gossamer.node.rpc:Service",
    "rpc": "gossamer.node.rpc:rpc",
    "Refused": "gossamer.node.errors:Refused",
    # training (needs torch): bring your own model and join a DiLoCo run
    "Worker": "gossamer.training.sdk:Worker",
    "DiLoCoConfig": "gossamer.training.diloco_config:DiLoCoConfig",
    "TrainResult": "gossamer.training.diloco_results:TrainResult",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS, extra=("__version__",))
