"""How a part's owner turns its members' contributions into one piece: weights it believes and
a rule that a lone liar cannot steer (pure: tensors in, tensor out).

A contribution's weight is its token count, and the contributor says what it is.  Believed as
sent, one member claiming 10¹⁵ tokens *is* the average.  :func:`admitted_weights` bounds it:

* ``weights = "bounded"`` (the default): at most ``max_weight``, the run's recipe's bound on
  one round (inner steps × tokens per step), when the run states it — a liar then weighs what
  an honest full round does; without one, at most :data:`MEDIAN_WEIGHT_FACTOR` × the round's
  lower-median claim, a bound that needs no recipe and holds a liar to two honest shares (it
  also caps an honest member that did more than twice the median's steps);
* ``weights = "equal"``: every contribution counts once.

:func:`aggregate` then applies the run's rule (``aggregate`` in ``[diloco]``):

* ``mean``: the weighted mean, bit for bit :func:`~gossamer.training.collective_plan.reduce_piece`;
* ``trimmed_mean``: per coordinate, the ``trim`` fraction of the highest and of the lowest
  values is dropped (at least one each with ≥ 3 contributors) and the rest averaged, weighted;
* ``centered_clip`` (BTARD, Gorbunov et al. 2021): start at the coordinate-wise median, then a
  few times move towards each contribution by at most a radius τ — the median distance of
  the contributions from the start, so the round's own statistics set it:
  ``v ← v + Σ wᵢ · min(1, τ/‖xᵢ − v‖) · (xᵢ − v) / Σ wᵢ``.

The owner's screen (:func:`~gossamer.training.collective_plan.screen`) is given the admitted
weights too: a norm counts times its weight over the median weight, so a large weight cannot
carry a vector that the unweighted screen would let through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gossamer.training.collective_plan import lower_median, reduce_piece

RULES = ("mean", "trimmed_mean", "centered_clip")
WEIGHTINGS = ("bounded", "equal")
MEDIAN_WEIGHT_FACTOR = 2.0  # a bounded weight is at most this × the round's lower-median claim


@dataclass(frozen=True)
class Aggregation:
    """The run's choice: how weights are believed and how a piece is reduced."""

    rule: str = "mean"
    weights: str = "bounded"
    max_weight: float | None = None  # the recipe's bound on one round's tokens, when known
    trim: float = 0.2  # trimmed_mean: the fraction dropped at each end
    clip_iterations: int = 1  # centered_clip (CClip: one move from a good start suffices)
    # the robust rules also refuse a contribution pointing away from the others'
    # (collective_plan.screen); off where honest pseudo-gradients need not share a direction
    direction_screen: bool = True

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"aggregate must be one of {', '.join(RULES)}, not {self.rule!r}")
        if self.weights not in WEIGHTINGS:
            choices = ", ".join(WEIGHTINGS)
            raise ValueError(f"weights must be one of {choices}, not {self.weights!r}")
        if self.max_weight is not None and not (
            math.isfinite(self.max_weight) and self.max_weight > 0
        ):
            raise ValueError("max_weight must be a positive number")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        if self.clip_iterations < 1:
            raise ValueError("clip_iterations must be at least 1")


def admitted_weights(claimed: dict[str, float], aggregation: Aggregation) -> dict[str, float]:
    """The weight each contributor is believed to have (claims must be finite and positive)."""
    if aggregation.weights == "equal":
        return dict.fromkeys(claimed, 1.0)
    if aggregation.max_weight is not None:
        cap = aggregation.max_weight  # an honest full round, exactly: honest weights stand
    elif len(claimed) >= 2:
        cap = MEDIAN_WEIGHT_FACTOR * lower_median(list(claimed.values()))
    else:
        cap = math.inf
    return {peer: min(weight, cap) for peer, weight in claimed.items()}


def aggregate(
    contributions: dict[str, tuple[torch.Tensor, float]], aggregation: Aggregation
) -> tuple[torch.Tensor, float]:
    """Reduce one piece under ``aggregation``; the weights are the admitted ones.  Returns the
    reduced fp32 tensor and the total admitted weight."""
    if not contributions:
        raise ValueError("nothing to reduce")
    if aggregation.rule == "mean" or len(contributions) < 3:
        # with one or two contributions no rule can tell which one is off
        return reduce_piece(contributions)
    peers = sorted(contributions)
    stacked = torch.stack([contributions[p][0] for p in peers])  # (n, elems)
    weights = torch.tensor([contributions[p][1] for p in peers], dtype=torch.float32)
    total = math.fsum(contributions[p][1] for p in peers)
    if aggregation.rule == "trimmed_mean":
        return _trimmed_mean(stacked, weights, aggregation.trim), total
    return _centered_clip(stacked, weights, aggregation.clip_iterations), total


def _trimmed_mean(stacked: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    n = stacked.shape[0]
    cut = min(max(1, int(trim * n)), (n - 1) // 2)
    order = torch.argsort(stacked, dim=0)
    kept = order[cut : n - cut]  # (n - 2·cut, elems): who holds each kept rank, per coordinate
    values = torch.gather(stacked, 0, kept)
    kept_weights = weights[kept]
    return (values * kept_weights).sum(0) / kept_weights.sum(0)


def _centered_clip(stacked: torch.Tensor, weights: torch.Tensor, iterations: int) -> torch.Tensor:
    center = stacked.median(dim=0).values
    distances = torch.linalg.vector_norm(stacked - center, dim=1)
    radius = float(distances.median())
    if radius <= 0.0:  # most contributions agree exactly: the median is the answer
        return center.clone()
    share = weights / weights.sum()
    for _ in range(iterations):
        offsets = stacked - center
        norms = torch.linalg.vector_norm(offsets, dim=1)
        scale = torch.clamp(radius / torch.clamp(norms, min=1e-30), max=1.0)
        center = center + ((share * scale)[:, None] * offsets).sum(0)
    return center


__all__ = [
    "MEDIAN_WEIGHT_FACTOR",
    "RULES",
    "WEIGHTINGS",
    "Aggregation",
    "admitted_weights",
    "aggregate",
]
