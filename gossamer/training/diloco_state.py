"""The state DiLoCo members agree on, and the flat vectors a round moves it by.

:class:`State` is S_r (parameters and outer optimizer state, fp32 on the CPU, with its digest);
:func:`flat_pseudo_gradient` is what a member contributes to the all-reduce, :func:`unflatten`
reads the average back per parameter and :func:`outer_step` takes S_r to S_{r+1}; the arithmetic
is :mod:`gossamer.training.outer`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gossamer.training.outer import OuterState, apply_outer_step, state_digest


@dataclass(frozen=True)
class State:
    """What all members agree on at the start of a round: S_r (fp32, CPU)."""

    params: dict[str, torch.Tensor]
    outer: OuterState
    digest: str

    @property
    def round(self) -> int:
        return self.outer.step

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor], outer: OuterState) -> State:
        params = dict(params)
        return cls(params, outer, state_digest(params, outer))


def flat_pseudo_gradient(
    start: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """θ_start − θ_local as one flat fp32 vector, names sorted (outer.pseudo_gradient's bits)."""
    if set(start) != set(local):
        raise ValueError(f"parameter names differ: {sorted(set(start) ^ set(local))[:5]}")
    total = sum(t.numel() for t in start.values())
    out = torch.empty(total, dtype=torch.float32)
    offset = 0
    for name in sorted(start):
        a = start[name].reshape(-1)
        b = local[name].detach().to("cpu", torch.float32).reshape(-1)
        torch.sub(a, b, out=out[offset : offset + a.numel()])
        offset += a.numel()
    return out


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (names sorted)."""
    out, offset = {}, 0
    for name in sorted(like):
        n = like[name].numel()
        out[name] = flat[offset : offset + n].view(like[name].shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the parameters {offset}")
    return out


def outer_step(state: State, avg: Mapping[str, torch.Tensor]) -> State:
    params, outer = apply_outer_step(state.params, avg, state.outer)
    return State.of(params, outer)
