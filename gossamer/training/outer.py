"""The DiLoCo outer step, as pure functions of tensors (no I/O, no clock, no RNG).

One round, as every member computes it:

1. ``pseudo_gradient(start, local)``: θ_start − θ_local, fp32, per worker;
2. receive the others' (decoded) pseudo-gradients; the collective screens them on the way
   (``collective_plan.screen``: which pieces a part owner refuses, and why);
3. ``weighted_average(contributions)``: tokens-weighted mean, summed in a canonical order;
4. ``apply_outer_step(params, avg, state)``: SGD with Nesterov momentum (lr 0.7, momentum 0.9);
5. ``state_digest(params, state)``: sha256 over the raw bytes, compared between members.

Bit-identical results across members. Floating-point addition is not associative, so members
must add the same numbers in the same order with the same rounding. Here:

* contributions are summed sorted by peer id (never in arrival order), with weights
  tokens_i / total computed as Python floats (correctly rounded) then rounded to fp32;
* every step is a separate elementwise torch op (one multiply, then one add), each of which is
  exactly rounded IEEE-754 on every CPU. No ``add(x, alpha=…)``/``addcmul``: torch may compute
  those with a fused multiply-add on one CPU (AVX2/AVX-512/NEON) and with two roundings on
  another (a build without FMA), which differs in the last bit;
* parameters, pseudo-gradients and momentum buffers are fp32 on the CPU; no reductions (whose
  order depends on threads and vector width) are involved in the update itself.

The update is the same arithmetic as ``torch.optim.SGD(nesterov=True)`` applied to the averaged
pseudo-gradient as the gradient; on a torch build that does not fuse multiply-adds
(``ATEN_CPU_CAPABILITY=default``) the two agree bit for bit, which the tests check. Denormals must
not be flushed to zero (torch's default; ``torch.set_flush_denormal(True)`` would break parity).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "Contribution",
    "OuterState",
    "Params",
    "apply_outer_step",
    "init_outer_state",
    "pseudo_gradient",
    "state_digest",
    "weighted_average",
]

Params = Mapping[str, torch.Tensor]


class Contribution(NamedTuple):
    """One member's (decoded) pseudo-gradient for a round, weighted by the tokens it trained on."""

    peer_id: str
    tensors: Params
    tokens: int


def _fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def pseudo_gradient(start_params: Params, local_params: Params) -> dict[str, torch.Tensor]:
    """θ_start − θ_local in fp32: where the inner steps went, sign-flipped like a gradient."""
    if set(start_params) != set(local_params):
        missing = sorted(set(start_params) ^ set(local_params))
        raise ValueError(f"start and local parameters differ in names: {missing}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(start_params):
        a, b = start_params[name], local_params[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        out[name] = _fp32_cpu(a) - _fp32_cpu(b)
    return out


def weighted_average(contributions: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """Tokens-weighted mean of the contributions' tensors, bit-reproducible.

    Sorted by ``peer_id`` before summing, so every member that holds the same set gets the same
    bits whatever order the contributions arrived in. Inputs are assumed validated (see
    ``screen_contributions``); names, shapes and ``tokens > 0`` are still checked here.
    """
    if not contributions:
        raise ValueError("no contributions to average")
    ordered = sorted(contributions, key=lambda c: c.peer_id)
    ids = [c.peer_id for c in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate peer ids in {ids}")
    for c in ordered:
        if not isinstance(c.tokens, int) or isinstance(c.tokens, bool) or c.tokens <= 0:
            raise ValueError(f"peer {c.peer_id}: tokens must be a positive int, got {c.tokens!r}")
    total = sum(c.tokens for c in ordered)
    names = sorted(ordered[0].tensors)
    for c in ordered[1:]:
        if sorted(c.tensors) != names:
            raise ValueError(
                f"peer {c.peer_id}: tensor names differ from peer {ordered[0].peer_id}"
            )
    weights = [torch.tensor(c.tokens / total, dtype=torch.float32) for c in ordered]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        acc = _fp32_cpu(ordered[0].tensors[name]) * weights[0]
        for c, w in zip(ordered[1:], weights[1:], strict=True):
            acc.add_(_fp32_cpu(c.tensors[name]) * w)  # multiply, then add: two roundings
        out[name] = acc
    return out


@dataclass
class OuterState:
    """Everything the outer optimizer carries between rounds, as plain values and tensors.

    ``momentum_buffers`` holds one fp32 tensor per parameter (zeros before the first step, when
    torch's SGD would have none); ``step`` counts applied outer steps.
    """

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    step: int = 0
    momentum_buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def init_outer_state(
    params: Params, *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True
) -> OuterState:
    """Fresh state for ``params``: zero momentum buffers, step 0."""
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr} momentum={momentum}")
    if nesterov and momentum == 0:
        raise ValueError("Nesterov momentum needs momentum > 0")
    buffers = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in sorted(params.items())}
    return OuterState(lr, momentum, nesterov, 0, buffers)


def apply_outer_step(
    params: Params, avg_pseudo_grad: Params, outer_state: OuterState
) -> tuple[dict[str, torch.Tensor], OuterState]:
    """One outer SGD(+Nesterov) step; returns new params and new state, inputs untouched.

    Same arithmetic as ``torch.optim.SGD(lr, momentum, nesterov=True)`` with the averaged
    pseudo-gradient as the gradient (dampening 0, no weight decay)::

        buf = g                      (first step)
        buf = momentum·buf + g       (later steps)
        d   = g + momentum·buf       (Nesterov; plain momentum: d = buf)
        θ   = θ + (−lr)·d

    each product and sum rounded separately (see the module docstring for why).
    """
    s = outer_state
    if set(params) != set(avg_pseudo_grad) or set(params) != set(s.momentum_buffers):
        raise ValueError("params, pseudo-gradient and momentum buffers must share names")
    new_params: dict[str, torch.Tensor] = {}
    new_buffers: dict[str, torch.Tensor] = {}
    for name in sorted(params):
        p, g, b = params[name], avg_pseudo_grad[name], s.momentum_buffers[name]
        if not (p.dtype == g.dtype == b.dtype == torch.float32):
            raise ValueError(f"{name}: params, pseudo-gradient and buffers must be fp32")
        if not (p.shape == g.shape == b.shape):
            raise ValueError(f"{name}: shapes differ: {tuple(p.shape)} {tuple(g.shape)}")
        g = g.detach()
        buf = g.clone() if s.step == 0 else (b * s.momentum).add_(g)
        d = g + buf * s.momentum if s.nesterov else buf
        new_params[name] = p.detach() + d * (-s.lr)
        new_buffers[name] = buf
    return new_params, OuterState(s.lr, s.momentum, s.nesterov, s.step + 1, new_buffers)


def _put(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _put_tensor(h: hashlib._Hash, key: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    _put(h, f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}".encode())
    raw = t.reshape(-1).view(torch.uint8)  # works for bf16 too, which numpy lacks
    h.update(struct.pack("<Q", raw.numel()))
    if raw.numel():
        h.update(memoryview(raw.numpy()))


def state_digest(params: Params, outer_state: OuterState | None = None) -> str:
    """sha256 (hex) over params and outer state: names sorted, each tensor's dtype, shape, raw
    little-endian bytes; then lr, momentum, nesterov, step and the momentum buffers.

    Bit-exact on purpose: −0.0 and 0.0 differ, as do NaN payloads. Members compare it after each
    outer step; a mismatch means someone must re-fetch the state.
    """
    h = hashlib.sha256(b"gossamer-state-v1\0")
    _put(h, struct.pack("<Q", len(params)))
    for name in sorted(params):
        _put_tensor(h, "param/" + name, params[name])
    if outer_state is not None:
        s = outer_state
        _put(h, struct.pack("<dd?Q", s.lr, s.momentum, s.nesterov, s.step))
        _put(h, struct.pack("<Q", len(s.momentum_buffers)))
        for name in sorted(s.momentum_buffers):
            _put_tensor(h, "momentum/" + name, s.momentum_buffers[name])
    return h.hexdigest()
