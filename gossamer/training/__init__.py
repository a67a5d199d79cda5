"""Training layer: DiLoCo rounds and the collective, compression, state sync, the SDK worker,
decentralized diffusion (``gossamer.training.diffusion``).  This is the layer's face: code above it
imports these names from ``gossamer.training``; modules inside import each other directly.  Names
load lazily, so importing the package does not import torch until a name needs it.
"""

from __future__ import annotations

from gossamer._lazy import lazy_face

_EXPORTS = {
    "get_codec": "gossamer.training.codecs",
    "all_reduce": "gossamer.training.collective",
    "load_corpus": "gossamer.training.data",
    "DiLoCoWorker": "gossamer.training.diloco",
    "DiLoCoConfig": "gossamer.training.diloco_config",
    "RoundRecord": "gossamer.training.diloco_results",
    "TrainResult": "gossamer.training.diloco_results",
    "keep_freed_memory": "gossamer.training.memory",
    "Recipe": "gossamer.training.recipe",
    "RunFile": "gossamer.training.run_file",
    "load_run_file": "gossamer.training.run_file",
    "Worker": "gossamer.training.sdk",
    "open_run": "gossamer.training.sdk",
    "SimConfig": "gossamer.training.simulate",
    "run_ddp": "gossamer.training.simulate",
    "StateService": "gossamer.training.statesync",
    "result_summary": "gossamer.training.worker",
    "run_worker": "gossamer.training.worker",
    "spawn_worker": "gossamer.training.worker",
    "WorkerProcess": "gossamer.training.worker",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
