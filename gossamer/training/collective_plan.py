"""How an all-reduce cuts and sums the flat vector: the pure parts of the collective.

:class:`Plan` gives each member one contiguous, block-aligned part of the vector (so blockwise
codecs quantise identically everywhere) and cuts each part into pieces of a few MB;
:func:`reduce_piece` is the tokens-weighted sum of one piece, bit for bit the single-process
reference's arithmetic; :func:`screen` picks the contributions an owner refuses. The protocol
that uses them is :mod:`gossamer.training.collective`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK = 256  # the blockwise codecs' block: parts and pieces start on a block boundary
DEFAULT_PIECE_ELEMS = 2 << 20  # 8 MiB of fp32 per piece
# a contribution this many times the median norm of the others is refused: honest pseudo-
# gradients of one round differ in norm by well under 2x (same H, same lr; a member that took
# fewer steps is smaller, never larger); a scaled or weight-inflated one is far past it
SCALE_LIMIT = 10.0
# the direction screen applies where the round's contributions share a direction: their median
# cosine with the round's median is at least this
AGREEMENT_MIN = 0.2


@dataclass(frozen=True)
class Plan:
    """Who owns which range of the flat vector, and how ranges are cut into pieces."""

    members: tuple[str, ...]
    numel: int
    piece_elems: int = DEFAULT_PIECE_ELEMS

    def __post_init__(self) -> None:
        if list(self.members) != sorted(set(self.members)):
            raise ValueError("plan members must be sorted and unique")
        if self.piece_elems % BLOCK:
            raise ValueError(f"piece size must be a multiple of {BLOCK}")

    def part(self, index: int) -> tuple[int, int]:
        blocks = math.ceil(self.numel / BLOCK)
        per = math.ceil(blocks / len(self.members)) * BLOCK
        return min(index * per, self.numel), min((index + 1) * per, self.numel)

    def pieces(self, index: int) -> list[tuple[int, int]]:
        start, end = self.part(index)
        return [(a, min(a + self.piece_elems, end)) for a in range(start, end, self.piece_elems)]


def reduce_piece(
    contributions: dict[str, tuple[torch.Tensor, float]],
) -> tuple[torch.Tensor, float]:
    """Tokens-weighted mean of fp32 tensors, summed in peer-id order (bit-deterministic)."""
    if not contributions:
        raise ValueError("nothing to reduce")
    peers = sorted(contributions)
    total = math.fsum(contributions[p][1] for p in peers)
    if total <= 0:
        raise ValueError("contribution weights must sum to a positive number")
    # The same arithmetic as outer.weighted_average, so a network all-reduce (codec none)
    # gives the single-process reference's bits: fp32 weights w/total, then one multiply and
    # one add per contributor, each rounded (no fused ``add_(alpha=...)``, which some CPUs
    # compute with an FMA and others without).
    acc: torch.Tensor | None = None
    for peer in peers:
        tensor, weight = contributions[peer]
        term = tensor * torch.tensor(weight / total, dtype=torch.float32)
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return acc, total


def screen(
    pieces: dict[str, torch.Tensor],
    limit: float = SCALE_LIMIT,
    weights: dict[str, float] | None = None,
    direction: bool = False,
) -> dict[str, str]:
    """Contributors to refuse, with the reason: non-finite values, or a norm far off the others'.

    With three or more contributors, one whose norm exceeds ``limit`` × the
    median norm of the others is refused; with two, only non-finite values are
    (there is no majority to say which one is off).  With ``weights`` (the admitted ones) a
    norm counts times its weight over the median weight: what the contribution moves the
    mean by, so that a weight cannot carry a vector the screen would refuse.

    ``direction`` (the robust rules): with three or more contributors that share a direction
    in this piece (median cosine with the round's coordinate-wise median ≥ AGREEMENT_MIN), one
    pointing the other way (cosine below −½ of that median) is refused too. Honest members
    descend the same loss from the same start, so their pseudo-gradients agree in direction
    where the signal is not drowned in noise; a sign-flipped one does not. In the spirit of
    FLTrust's cosine trust score, with the round's own robust centre as the reference.
    """
    refused: dict[str, str] = {}
    norms: dict[str, float] = {}
    median_weight = lower_median([weights[p] for p in pieces]) if weights else 1.0
    for peer, tensor in pieces.items():
        norm = float(torch.linalg.vector_norm(tensor)) if tensor.numel() else 0.0
        if weights is not None:
            norm *= weights[peer] / max(median_weight, 1e-30)
        if not math.isfinite(norm):
            refused[peer] = "contains NaN or Inf"
        else:
            norms[peer] = norm
    if len(norms) >= 3:
        for peer, norm in norms.items():
            others = sorted(v for p, v in norms.items() if p != peer)
            median = others[len(others) // 2]
            if norm > limit * max(median, 1e-12) and norm > 1e-6:
                refused[peer] = f"norm {norm:.3g} is {norm / max(median, 1e-12):.3g}× the median"
    if direction:
        refused.update(_pointing_away({p: t for p, t in pieces.items() if p not in refused}))
    return refused


def _pointing_away(pieces: dict[str, torch.Tensor]) -> dict[str, str]:
    if len(pieces) < 3:
        return {}
    peers = sorted(pieces)
    stacked = torch.stack([pieces[p] for p in peers]).to(torch.float64)
    center = stacked.median(dim=0).values
    center_norm = float(torch.linalg.vector_norm(center))
    if center_norm == 0.0:
        return {}
    cosines = {}
    for i, peer in enumerate(peers):
        norm = float(torch.linalg.vector_norm(stacked[i]))
        if norm > 0.0:
            cosines[peer] = float(stacked[i] @ center) / (norm * center_norm)
    agreement = sorted(cosines.values())[len(cosines) // 2] if cosines else 0.0
    if agreement < AGREEMENT_MIN:
        # no common direction in this piece (noise-dominated parameters): nothing to enforce
        return {}
    return {
        peer: f"points away from the round's median (cosine {c:.2f}, the others ~{agreement:.2f})"
        for peer, c in cosines.items()
        if c < -0.5 * agreement
    }


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count); 1.0 if empty."""
    if not values:
        return 1.0
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


Screen = Callable[[dict[str, torch.Tensor]], dict[str, str]]
