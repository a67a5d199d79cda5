"""Ensemble sampling over *async* experts — remote peers or local modules, mixed freely.

:func:`sample_network` is the core sampler (``ensemble.sample``) with the experts asked
concurrently: each Euler step evaluates the router locally, plans which rows each expert must
answer (``plan_requests``), sends every chosen expert one batched request at the same time and
combines the answers with the core's own combination, in expert order — so for the same answers
it returns bit for bit what the sequential core returns (the network tests check it for every
mode against local modules). Experts are ``await expert(x_t, t) -> v`` callables that raise
``ExpertUnavailable`` when they cannot answer; those that also have ``integrate(x, start, end,
steps)`` let sticky sampling send each expert one request for its rows' whole trajectory.
Nothing here knows about the network (``network.RemoteExpert`` is the remote implementation).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import torch
import trio
from torch.nn import functional as nn_functional

from gossamer.training.diffusion.ensemble import (
    ExpertUnavailable,
    NoExpertForRows,
    RoutingMode,
    _combine,
    plan_requests,
)
from gossamer.training.diffusion.router import Router

log = logging.getLogger(__name__)

AsyncExpert = Callable[[torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]


class LocalExpert:
    """An in-process expert with the interface of ``network.RemoteExpert`` (forwards run in a
    worker thread): the local reference for :func:`sample_network`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return self.module(x, t)

        return await trio.to_thread.run_sync(run)

    async def integrate(self, x: torch.Tensor, start: int, end: int, steps: int) -> torch.Tensor:
        def run() -> torch.Tensor:
            dt, y = 1.0 / steps, x
            with torch.no_grad():
                for i in range(start, end):
                    y = y + dt * self.module(y, torch.full((y.shape[0],), i * dt))
            return y

        return await trio.to_thread.run_sync(run)


def _router_fn(
    router: Router | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], temperature: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(router, Router):
        return lambda x, t: router.probs(x, t, temperature)
    return router


async def ensemble_velocity_network(
    route: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    experts: Mapping[int, AsyncExpert],
    x_t: torch.Tensor,
    t: torch.Tensor,
    mode: str | RoutingMode,
    alive: set[int],
) -> torch.Tensor:
    """``ensemble.ensemble_velocity`` with the experts asked concurrently.

    Same plan, same combination, same handling of experts that fail (dropped from ``alive``,
    their rows re-planned over the rest), answers combined in expert order — so it returns
    exactly what the sequential core function returns for the same answers.
    """

    def probs_of() -> torch.Tensor:
        with torch.no_grad():
            return route(x_t, t)

    probs = await trio.to_thread.run_sync(probs_of)
    out = torch.empty_like(x_t)
    pending = torch.arange(x_t.shape[0], device=x_t.device)
    while pending.numel():
        p, x, tt = probs[pending], x_t[pending], t[pending]
        usable = alive & set(experts)
        plan = plan_requests(p, mode, usable)
        got: dict[int, torch.Tensor] = {}

        async def ask(
            e: int,
            rows: torch.Tensor,
            got: dict[int, torch.Tensor] = got,
            x: torch.Tensor = x,
            tt: torch.Tensor = tt,
        ) -> None:
            try:
                got[e] = await experts[e](x[rows], tt[rows])
            except ExpertUnavailable as exc:
                log.warning("expert %d unavailable, dropping it: %s", e, exc)
                alive.discard(e)

        async with trio.open_nursery() as nursery:
            for e, rows in plan.items():
                nursery.start_soon(ask, e, rows)
        answers = {e: got[e] for e in plan if e in got}  # expert order: the core's sum order
        if not answers:
            if not alive & set(experts):
                raise NoExpertForRows(pending)
            continue
        with torch.no_grad():
            v, ok = _combine(p, answers, mode, usable)
        out[pending[ok]] = v[ok]
        pending = pending[~ok]
    return out


async def sample_network(
    router: Router | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    experts: Mapping[int, AsyncExpert],
    n: int,
    steps: int = 50,
    mode: str | RoutingMode = "full",
    temperature: float = 1.0,
    seed: int = 0,
    image_shape: tuple[int, int, int] | None = None,
    noise: torch.Tensor | None = None,
    sticky_from: float | None = None,
    on_step: Callable[[int, torch.Tensor], Awaitable[None] | None] | None = None,
    offload: bool = True,
) -> torch.Tensor:
    """``ensemble.sample`` over async (e.g. remote) experts; same arguments, same result.

    The router runs locally every step; ``on_step(i, x)`` is awaited after each Euler step
    (progress reports; tests use it to kill a host mid-sampling). With ``sticky_from`` and
    ``offload`` (and experts that have ``integrate``), the rows' remaining trajectories are
    integrated by their experts in one request each from the switch on — the same numbers as
    per-step requests, at one round trip per expert instead of one per step. If an expert dies
    during an offloaded trajectory, its rows redraw among the living at the switch point and
    start over there (per-step sticky redraws at the step of the death instead).
    """
    if noise is None:
        shape = image_shape or getattr(router, "image_shape", None)
        if shape is None:
            raise ValueError("pass image_shape or noise")
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    route = _router_fn(router, temperature)
    alive = set(experts)
    chosen = torch.full((noise.shape[0],), -1, dtype=torch.long)
    n_experts = max(experts) + 1 if experts else 0
    draw_gen = torch.Generator().manual_seed(seed + 1)

    def living_mask() -> torch.Tensor:
        living = torch.zeros(n_experts, dtype=torch.bool)
        living[[e for e in alive if 0 <= e < n_experts]] = True
        if not bool(living.any()):
            raise NoExpertForRows(torch.arange(chosen.shape[0]))
        return living

    async def draw(x: torch.Tensor, t: torch.Tensor, living: torch.Tensor) -> None:
        """Rows without a living expert draw one from the router (the core's arithmetic)."""
        redraw = (chosen < 0) | ~living[chosen.clamp(min=0)]
        if bool(redraw.any()):
            probs = await trio.to_thread.run_sync(lambda: route(x[redraw], t[redraw]))
            p = torch.where(living, probs.double(), 0.0)
            p = torch.where(p.sum(1, keepdim=True) > 0, p, living.double().expand_as(p))
            chosen[redraw] = torch.multinomial(p, 1, generator=draw_gen).flatten()

    async def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if sticky_from is None or float(t[0]) < sticky_from:
            return await ensemble_velocity_network(route, experts, x, t, mode, alive)
        await draw(x, t, living_mask())
        onehot = nn_functional.one_hot(chosen, n_experts).float()
        return await ensemble_velocity_network(lambda *_: onehot, experts, x, t, "top1", alive)

    async def offloaded(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        out = x.clone()
        todo = torch.ones(x.shape[0], dtype=torch.bool)
        while bool(todo.any()):
            await draw(x, t, living_mask())
            groups = {e: torch.nonzero(todo & (chosen == e)).flatten() for e in sorted(alive)}

            async def run(e: int, rows: torch.Tensor) -> None:
                try:
                    out[rows] = await experts[e].integrate(x[rows], i, steps, steps)  # type: ignore[attr-defined]
                    todo[rows] = False
                except ExpertUnavailable as exc:
                    log.warning("expert %d unavailable, its rows redraw: %s", e, exc)
                    alive.discard(e)

            async with trio.open_nursery() as nursery:
                for e, rows in groups.items():
                    if rows.numel():
                        nursery.start_soon(run, e, rows)
        return out

    can_offload = offload and all(hasattr(f, "integrate") for f in experts.values())
    x = noise.clone()
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device)
        if can_offload and sticky_from is not None and float(t[0]) >= sticky_from:
            x = await offloaded(x, t, i)
            if on_step is not None:
                result = on_step(steps - 1, x)
                if result is not None:
                    await result
            break
        x = x + dt * await velocity(x, t)
        if on_step is not None:
            result = on_step(i, x)
            if result is not None:
                await result
    return x


def mode_arguments(mode: str) -> tuple[str, float | None]:
    """CLI mode name → (routing mode, sticky_from): ``sticky`` = draw one expert at t = 0."""
    if mode == "sticky":
        return "full", 0.0
    RoutingMode.parse(mode)
    return mode, None


__all__ = [
    "AsyncExpert",
    "LocalExpert",
    "ensemble_velocity_network",
    "mode_arguments",
    "sample_network",
]
