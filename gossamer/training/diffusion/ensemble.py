"""How the router's probabilities turn expert velocities into one velocity — pure functions.

For router probabilities p (B, K) the ensemble velocity of row b is Σ_k w_bk · v_k(x_b, t_b) with
weights from the routing mode:

* ``full``: w = p. With a perfect router and perfect experts this is exactly the velocity of the
  whole data distribution (the mixture of the clusters), which is why it samples best; it asks all
  K experts for every row.
* ``top1``: all weight on argmax p. One expert per row, but at small t the router can only say the
  prior, so top-1 sends everything to the biggest cluster there (the calibration saw it collapse).
* ``topk`` (``top2``, ``top3``, …): the k largest probabilities, renormalised to sum to one.

``sample(..., sticky_from=t)`` is a fourth policy built on these: each sample draws one expert
from the router once and keeps it (exact for an exact router and experts; top-1's price).

Experts that are down are left out *before* selection (``available`` in ``plan_requests``), and
experts that fail to answer are left out *after* it: ``combine`` renormalises each row over the
selected experts that answered. A row none of whose selected experts answered cannot be combined;
``sample`` then re-plans that row over the experts still alive. Ties in top-k go to the lower
expert id, so the plan is deterministic.

``plan_requests`` says which rows each expert is needed for, so a network layer sends every expert
one batched request for exactly those rows. An expert is any ``velocity(x_t, t) -> v`` callable
over a subset of rows; a remote one raises ``ExpertUnavailable`` when its peer is gone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as nn_functional

from gossamer.training.diffusion.router import Router

log = logging.getLogger(__name__)

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertUnavailable(RuntimeError):
    """Raised by an expert callable whose expert cannot answer (peer gone, timed out)."""


class NoExpertForRows(RuntimeError):
    """Some rows have no selected expert that answered; ``rows`` lists them."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__(f"{rows.numel()} rows have no answering expert")
        self.rows = rows


@dataclass(frozen=True)
class RoutingMode:
    """``kind`` is ``"top"`` (with ``k`` experts per row) or ``"full"`` (every expert)."""

    kind: str
    k: int = 0

    @classmethod
    def parse(cls, mode: str | RoutingMode) -> RoutingMode:
        """Accept ``"full"``, ``"top1"``, ``"top2"``, … (or a RoutingMode)."""
        if isinstance(mode, RoutingMode):
            return mode
        if mode == "full":
            return cls("full")
        m = re.fullmatch(r"top(\d+)", mode)
        if m and int(m.group(1)) >= 1:
            return cls("top", int(m.group(1)))
        raise ValueError(f"unknown routing mode {mode!r}: use 'full', 'top1', 'top2', …")

    def __str__(self) -> str:
        return "full" if self.kind == "full" else f"top{self.k}"


def selection(
    probs: torch.Tensor, mode: str | RoutingMode, available: Collection[int] | None = None
) -> torch.Tensor:
    """Boolean (B, K): which experts each row asks, given which experts are believed alive."""
    m = RoutingMode.parse(mode)
    b, k = probs.shape
    alive = torch.ones(k, dtype=torch.bool, device=probs.device)
    if available is not None:
        alive = torch.zeros(k, dtype=torch.bool, device=probs.device)
        ids = [e for e in available if 0 <= e < k]
        alive[ids] = True
    if not bool(alive.any()):
        raise NoExpertForRows(torch.arange(b))
    if m.kind == "full" or m.k >= int(alive.sum()):
        return alive.expand(b, k).clone()
    masked = torch.where(alive, probs, torch.full_like(probs, -1.0))
    # stable descending sort: equal probabilities keep ascending expert order
    order = torch.sort(-masked, dim=1, stable=True).indices[:, : m.k]
    sel = torch.zeros(b, k, dtype=torch.bool, device=probs.device)
    sel.scatter_(1, order, True)
    return sel


def routing_weights(
    probs: torch.Tensor, mode: str | RoutingMode, available: Collection[int] | None = None
) -> torch.Tensor:
    """(B, K) weights: the selected probabilities, renormalised per row (uniform if all are 0)."""
    return _normalise(probs, selection(probs, mode, available))


def plan_requests(
    probs: torch.Tensor, mode: str | RoutingMode, available: Collection[int] | None = None
) -> dict[int, torch.Tensor]:
    """Expert id -> sorted row indices (long tensor) it must answer; idle experts omitted."""
    sel = selection(probs, mode, available)
    plan = {}
    for e in range(sel.shape[1]):
        rows = torch.nonzero(sel[:, e]).flatten()
        if rows.numel():
            plan[e] = rows
    return plan


def combine(
    probs: torch.Tensor,
    velocities_by_expert: Mapping[int, torch.Tensor],
    mode: str | RoutingMode,
    available: Collection[int] | None = None,
) -> torch.Tensor:
    """The ensemble velocity (B, ...) from the experts that answered.

    ``available`` must be what ``plan_requests`` was given. Each expert's tensor holds either its
    planned rows, in plan order, or all B rows. Experts missing from ``velocities_by_expert`` are
    dropped and each row's weights renormalised over the rest; raises ``NoExpertForRows`` if a row
    is left with none.
    """
    v, ok = _combine(probs, velocities_by_expert, mode, available)
    if not bool(ok.all()):
        raise NoExpertForRows(torch.nonzero(~ok).flatten())
    return v


def _normalise(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = torch.where(mask, probs, torch.zeros_like(probs))
    total = w.sum(dim=1, keepdim=True)
    uniform = mask.float() / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), uniform)


def _combine(
    probs: torch.Tensor,
    velocities_by_expert: Mapping[int, torch.Tensor],
    mode: str | RoutingMode,
    available: Collection[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined velocity and a (B,) mask of the rows that had at least one answer."""
    sel = selection(probs, mode, available)
    answered = torch.zeros_like(sel)
    for e in velocities_by_expert:
        if 0 <= e < sel.shape[1]:
            answered[:, e] = True
    mask = sel & answered
    weights = _normalise(probs, mask)
    out: torch.Tensor | None = None
    for e, v in velocities_by_expert.items():
        rows = torch.nonzero(sel[:, e]).flatten()
        if rows.numel() == 0:
            continue
        if v.shape[0] == probs.shape[0]:
            v = v[rows]
        elif v.shape[0] != rows.numel():
            raise ValueError(
                f"expert {e} returned {v.shape[0]} rows; planned {rows.numel()} "
                f"(or all {probs.shape[0]})"
            )
        if out is None:
            out = torch.zeros((probs.shape[0], *v.shape[1:]), dtype=v.dtype, device=v.device)
        w = weights[rows, e].to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
        out.index_add_(0, rows, w * v)
    if out is None:
        raise NoExpertForRows(torch.arange(probs.shape[0]))
    return out, mask.any(dim=1)


@torch.no_grad()
def ensemble_velocity(
    router: Router | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    experts: Mapping[int, ExpertFn],
    x_t: torch.Tensor,
    t: torch.Tensor,
    mode: str | RoutingMode = "full",
    temperature: float = 1.0,
    alive: set[int] | None = None,
) -> torch.Tensor:
    """One ensemble velocity evaluation: route, plan, ask each expert once, combine.

    ``router`` is a ``Router`` (its ``probs`` is used, with ``temperature``) or any callable
    returning (B, K) probabilities. ``alive`` (updated in place) is the set of experts believed
    up; an expert raising ``ExpertUnavailable`` is removed from it, and rows left without an
    answer are re-planned over the remaining experts.
    """
    if alive is None:
        alive = set(experts)
    probs = router.probs(x_t, t, temperature) if isinstance(router, Router) else router(x_t, t)
    out = torch.empty_like(x_t)
    pending = torch.arange(x_t.shape[0], device=x_t.device)
    while pending.numel():
        p, x, tt = probs[pending], x_t[pending], t[pending]
        usable = alive & set(experts)
        plan = plan_requests(p, mode, usable)
        answers = {}
        for e, rows in plan.items():
            try:
                answers[e] = experts[e](x[rows], tt[rows])
            except ExpertUnavailable as exc:
                log.warning("expert %d unavailable, dropping it: %s", e, exc)
                alive.discard(e)
        if not answers:
            if not alive & set(experts):
                raise NoExpertForRows(pending)
            continue
        v, ok = _combine(p, answers, mode, usable)
        out[pending[ok]] = v[ok]
        pending = pending[~ok]
    return out


@torch.no_grad()
def sample(
    router: Router | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    experts: Mapping[int, ExpertFn],
    n: int,
    steps: int = 50,
    mode: str | RoutingMode = "full",
    temperature: float = 1.0,
    seed: int = 0,
    image_shape: tuple[int, int, int] | None = None,
    noise: torch.Tensor | None = None,
    sticky_from: float | None = None,
) -> torch.Tensor:
    """Draw ``n`` images from the routed ensemble with ``steps`` Euler steps from t = 0 to 1.

    The noise comes from ``seed`` (or is passed as ``noise``, so several modes can be compared
    on the same starting points). Experts are callables, so local modules and remote peers mix.

    ``sticky_from``: from the first step with t ≥ this value, each row *draws* one expert from
    the router's probabilities and keeps it to the end (``mode`` applies before). With an exact
    router and exact experts this is still exact — x_t is a mixture sample, k ~ p(k | x_t)
    makes x_t a sample of cluster k, and expert k's flow carries it to cluster k's data — but each
    expert only ever sees inputs from its own cluster's path, where it was trained, and every row
    costs one expert call per step (top-1's price). ``sticky_from=0`` draws from the router at
    pure noise, i.e. from the cluster prior. A row whose expert dies redraws among the living.
    """
    from gossamer.training.diffusion.flow import euler_sample

    if noise is None:
        shape = image_shape or getattr(router, "image_shape", None)
        if shape is None:
            raise ValueError("pass image_shape or noise")
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    alive = set(experts)
    chosen = torch.full((noise.shape[0],), -1, dtype=torch.long)
    n_experts = max(experts) + 1 if experts else 0
    draw_gen = torch.Generator().manual_seed(seed + 1)

    def route(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if isinstance(router, Router):
            return router.probs(x, t, temperature)
        return router(x, t)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if sticky_from is None or float(t[0]) < sticky_from:
            return ensemble_velocity(route, experts, x, t, mode, 1.0, alive)
        living = torch.zeros(n_experts, dtype=torch.bool)
        living[[e for e in alive if 0 <= e < n_experts]] = True
        if not bool(living.any()):
            raise NoExpertForRows(torch.arange(x.shape[0]))
        redraw = (chosen < 0) | ~living[chosen.clamp(min=0)]
        if bool(redraw.any()):  # the router runs only here: at the switch and after a death
            p = torch.where(living, route(x[redraw], t[redraw]).double(), 0.0)
            p = torch.where(p.sum(1, keepdim=True) > 0, p, living.double().expand_as(p))
            chosen[redraw] = torch.multinomial(p, 1, generator=draw_gen).flatten()
        # one-hot "probabilities": top-1 asks exactly the chosen expert; if it fails mid-step,
        # the row falls back to the lowest-numbered living expert for this step and redraws
        # from the router at the next one
        onehot = nn_functional.one_hot(chosen, n_experts).float()
        return ensemble_velocity(lambda *_: onehot, experts, x, t, "top1", 1.0, alive)

    return euler_sample(velocity, noise, steps)


@torch.no_grad()
def sample_by_prior(
    experts: Mapping[int, ExpertFn],
    weights: Sequence[float],
    noise: torch.Tensor,
    steps: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """One expert per image, drawn with probability ∝ ``weights`` (cluster sizes); no router.

    Exact ancestral sampling of the mixture when the experts are exact, at the cost of one expert
    call per row per step; the yardstick that tells router error from expert error.
    """
    from gossamer.training.diffusion.flow import euler_sample

    ids = sorted(experts)
    p = torch.tensor([float(weights[e]) for e in ids], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(p / p.sum(), noise.shape[0], replacement=True, generator=gen)
    out = torch.empty_like(noise)
    for j, e in enumerate(ids):
        rows = torch.nonzero(pick == j).flatten()
        if rows.numel():
            out[rows] = euler_sample(experts[e], noise[rows], steps)
    return out
