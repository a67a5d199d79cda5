"""Fragments of a model and when each is exchanged: the pure half of the overlapped modes.

Streaming DiLoCo (Douillard et al., 2025) cuts the model into ``P`` fragments and exchanges
each once per round of ``H`` inner steps, at staggered offsets, so that at any time at most one
fragment's pseudo-gradient is on the wire (peak bandwidth ÷ P) and the exchange overlaps the
inner steps that follow it.  Here:

* :func:`partition`: which parameters make up each fragment.  A model whose parameters sit in a
  list of repeated blocks (``blocks.<i>.…``, any ``nn.ModuleList``/``nn.Sequential``) is cut
  *strided across depth* — block ``i`` goes to fragment ``i mod P``, so every fragment holds
  shallow and deep layers alike — and the rest (embeddings, final norm) is spread over the
  fragments to even out their sizes; the default ``P`` gives each fragment about three blocks.
  Any other model is cut into ``P`` runs of parameters of similar total size, in module order.
* :class:`FragmentSchedule`: after how many inner steps of a round each fragment's exchange
  starts (fragment ``p`` after ``⌊(p+1)·H/P⌋`` steps: the last one at the end of the round)
  and how many inner steps it overlaps at least (``sync_delay``, τ) before it is merged.
* :func:`mix` (Streaming DiLoCo's merge, θ ← α·θ_local + (1−α)·θ_global) and
  :func:`eager_estimate` (the eager update: our fresh pseudo-gradient standing in for our
  one-round-old one in the last average).

No torch state, no I/O, no clock: :mod:`gossamer.training.diloco_overlap` drives these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BLOCKS_PER_FRAGMENT",
    "FragmentSchedule",
    "block_index",
    "default_fragment_count",
    "eager_estimate",
    "mix",
    "partition",
]

BLOCKS_PER_FRAGMENT = 3  # Streaming DiLoCo's fragments: ~3 transformer blocks each
DEFAULT_FRAGMENTS_FLAT = 4  # a model without repeated blocks

# a repeated block: the first ``.<index>.`` in a parameter's dotted name (ModuleList/Sequential)
_BLOCK = re.compile(r"^(?P<list>(?:[^.]+\.)*?[^.]+)\.(?P<index>\d+)\.")


def block_index(name: str) -> tuple[str, int] | None:
    """(list name, index) of the repeated block a parameter belongs to, or None."""
    m = _BLOCK.match(name)
    return None if m is None else (m.group("list"), int(m.group("index")))


def _blocks(names: Sequence[str]) -> tuple[str, int] | None:
    """The list of repeated blocks with the most members (name, count), if it has ≥ 2."""
    counts: dict[str, set[int]] = {}
    for name in names:
        b = block_index(name)
        if b is not None:
            counts.setdefault(b[0], set()).add(b[1])
    if not counts:
        return None
    best = max(sorted(counts), key=lambda k: len(counts[k]))
    return (best, len(counts[best])) if len(counts[best]) >= 2 else None


def default_fragment_count(sizes: Mapping[str, int]) -> int:
    """About three blocks per fragment for a model of repeated blocks (at least 2 fragments
    when it has 2 or more blocks); ``DEFAULT_FRAGMENTS_FLAT`` runs otherwise (never more than
    there are parameters)."""
    blocks = _blocks(list(sizes))
    if blocks is not None:
        return max(2, round(blocks[1] / BLOCKS_PER_FRAGMENT))
    return max(1, min(DEFAULT_FRAGMENTS_FLAT, len(sizes)))


def partition(sizes: Mapping[str, int], count: int | None = None) -> tuple[tuple[str, ...], ...]:
    """``count`` fragments of the parameters ``sizes`` (name → numel, in module order).

    Every member computes the same fragments from the same model (the order of ``sizes`` is the
    model's). Each fragment's names are sorted, as the flat vectors that carry them are.
    """
    names = list(sizes)
    if not names:
        raise ValueError("a model without parameters has no fragments")
    p = default_fragment_count(sizes) if count is None else count
    if not 1 <= p <= len(names):
        raise ValueError(f"cannot cut {len(names)} parameters into {p} fragments")
    groups: list[list[str]] = [[] for _ in range(p)]
    blocks = _blocks(names)
    if blocks is not None and blocks[1] >= p:
        # strided across depth: block i -> fragment i mod P; the rest to the smallest fragment
        order = sorted({b[1] for n in names if (b := block_index(n)) and b[0] == blocks[0]})
        rank = {index: k for k, index in enumerate(order)}
        rest: list[str] = []
        for name in names:
            b = block_index(name)
            if b is not None and b[0] == blocks[0]:
                groups[rank[b[1]] % p].append(name)
            else:
                rest.append(name)
        totals = [sum(sizes[n] for n in g) for g in groups]
        for name in sorted(rest, key=lambda n: (-sizes[n], names.index(n))):
            k = min(range(p), key=lambda i: (totals[i], i))
            groups[k].append(name)
            totals[k] += sizes[name]
    else:
        # runs in module order, cut where the running total passes each 1/P of the whole
        total = sum(sizes.values())
        k, running = 0, 0
        for i, name in enumerate(names):
            must_move = len(names) - i <= p - 1 - k  # the later fragments need one name each
            if groups[k] and k < p - 1 and (must_move or running >= (k + 1) * total / p):
                k += 1
            groups[k].append(name)
            running += sizes[name]
    if any(not g for g in groups):
        raise ValueError(f"cannot cut these parameters into {p} non-empty fragments")
    return tuple(tuple(sorted(g)) for g in groups)


@dataclass(frozen=True)
class FragmentSchedule:
    """When each fragment's exchange of a round starts, and how long it overlaps at least."""

    inner_steps: int  # H
    fragments: int  # P
    sync_delay: int = 0  # τ: inner steps between an exchange's start and its merge, at least

    def __post_init__(self) -> None:
        if not 1 <= self.fragments <= self.inner_steps:
            raise ValueError(
                f"need 1 <= fragments <= inner_steps, got {self.fragments} and {self.inner_steps}"
            )
        if not 0 <= self.sync_delay < self.inner_steps:
            raise ValueError("sync_delay must be between 0 and inner_steps - 1")

    def offset(self, fragment: int) -> int:
        """Inner steps of a round after which ``fragment``'s exchange starts (1..H)."""
        return (fragment + 1) * self.inner_steps // self.fragments

    def starting_after(self, steps: int) -> list[int]:
        """The fragments whose exchange starts once ``steps`` inner steps of a round are done."""
        return [p for p in range(self.fragments) if self.offset(p) == steps]


def mix(local: torch.Tensor, global_: torch.Tensor, alpha: float) -> torch.Tensor:
    """Streaming DiLoCo's merge: α·θ_local + (1−α)·θ_global (α = 0: take the global one)."""
    if alpha == 0.0:
        return global_.clone()
    return local * alpha + global_ * (1.0 - alpha)


def eager_estimate(
    fresh: torch.Tensor,
    last_average: torch.Tensor | None,
    last_own: torch.Tensor | None,
    own_weight: float,
) -> torch.Tensor:
    """The eager update's outer gradient: the last round's average with our share of it
    replaced by our fresh pseudo-gradient — the others' one-round-old contributions plus ours
    from this round. Without a last round: our own pseudo-gradient alone."""
    if last_average is None or last_own is None:
        return fresh.clone()
    if not 0.0 < own_weight <= 1.0:
        raise ValueError(f"own_weight must be in (0, 1], got {own_weight}")
    return last_average + (fresh - last_own) * own_weight
