"""Checkpoints of the shared DiLoCo state: safetensors only, digest-verified on load.

A checkpoint holds what every member of a run agrees on after an outer step: the parameters, the
outer optimizer's state (hyper-parameters, step count, momentum buffers) and the round number,
plus free-form string metadata. Never pickle: a checkpoint may come from another peer, and
safetensors can only ever produce tensors and strings.

Layout inside the file: tensors ``param/<name>`` and ``momentum/<name>``; string metadata
``format`` (``gossamer-checkpoint-1``), ``round``, ``outer`` (JSON: lr, momentum, nesterov,
step), ``digest`` (``outer.state_digest`` of params + outer state) and ``user`` (JSON object of
the caller's strings). ``load_checkpoint`` recomputes the digest and refuses a mismatch, so a
truncated, edited or bit-flipped file never becomes the run's state. Writes are atomic
(temporary file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gossamer.node import GossamerError
from gossamer.training.outer import OuterState, Params, state_digest

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "gossamer-checkpoint-1"
_PARAM, _MOMENTUM = "param/", "momentum/"


class CheckpointError(GossamerError, ValueError):
    """A checkpoint file that is unreadable, malformed, or whose digest does not verify."""


@dataclass
class Checkpoint:
    params: dict[str, torch.Tensor]
    outer_state: OuterState
    round: int
    digest: str
    metadata: dict[str, str] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    params: Params,
    outer_state: OuterState,
    *,
    round: int,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write params + outer state atomically to ``path``; return the state digest."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    if set(outer_state.momentum_buffers) != set(params):
        raise ValueError("momentum buffers and params must have the same names")
    user = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise ValueError("metadata must map str to str")
    digest = state_digest(params, outer_state)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, group in ((_PARAM, params), (_MOMENTUM, outer_state.momentum_buffers)):
        for name in sorted(group):
            t = group[name].detach().to("cpu").contiguous()
            # safetensors refuses tensors that share memory (e.g. tied weights): copy those.
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[prefix + name] = t
    outer = {
        "lr": outer_state.lr,
        "momentum": outer_state.momentum,
        "nesterov": outer_state.nesterov,
        "step": outer_state.step,
    }
    meta = {
        "format": FORMAT,
        "round": str(round),
        "outer": json.dumps(outer),
        "digest": digest,
        "user": json.dumps(user, sort_keys=True),
    }
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint and verify its digest; raise ``CheckpointError`` if anything is off."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        round_ = int(meta["round"])
        outer = json.loads(meta["outer"])
        user = json.loads(meta.get("user", "{}"))
        digest = meta["digest"]
        lr, momentum = float(outer["lr"]), float(outer["momentum"])
        nesterov, step = outer["nesterov"], outer["step"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed metadata: {exc!r}") from exc
    if not isinstance(nesterov, bool) or not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{path}: malformed outer state {outer!r}")
    if not isinstance(user, dict):
        raise CheckpointError(f"{path}: user metadata is not an object")
    params = {k[len(_PARAM) :]: v for k, v in tensors.items() if k.startswith(_PARAM)}
    buffers = {k[len(_MOMENTUM) :]: v for k, v in tensors.items() if k.startswith(_MOMENTUM)}
    if len(params) + len(buffers) != len(tensors) or set(params) != set(buffers):
        raise CheckpointError(f"{path}: tensor names do not pair params with momentum buffers")
    state = OuterState(lr, momentum, nesterov, step, buffers)
    actual = state_digest(params, state)
    if actual != digest:
        raise CheckpointError(f"{path}: digest mismatch: recorded {digest}, contents {actual}")
    return Checkpoint(params, state, round_, digest, {str(k): str(v) for k, v in user.items()})
