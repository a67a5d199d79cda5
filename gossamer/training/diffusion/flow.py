"""Flow matching (rectified flow): the path, the loss, one expert's training loop, Euler sampling.

Convention, used everywhere in this package: t ∈ [0, 1], **t = 0 is noise, t = 1 is data**.
With x0 ~ N(0, I) and x1 a data image, x_t = t·x1 + (1 − t)·x0 and the target velocity is
dx_t/dt = x1 − x0. A model v(x_t, t) regresses that target; sampling integrates dx/dt = v from
t = 0 (pure noise) to t = 1.

Why this path: it is the conditional optimal-transport path of the DDM paper's experts; its target
does not depend on t, and a straight path needs few Euler steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from gossamer.training.diffusion.models import ExpertSpec

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_path(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·x1 + (1 − t)·x0, with t (B,) broadcast over the image dimensions."""
    tt = t.reshape(-1, *([1] * (x1.ndim - 1)))
    return tt * x1 + (1 - tt) * x0


def flow_matching_loss(
    model: nn.Module, x1: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean squared error between v(x_t, t) and x1 − x0, for fresh noise and t ~ U[0, 1]."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    pred = model(flow_path(x1, x0, t), t)
    return torch.mean((pred - (x1 - x0)) ** 2)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% (at most 500 steps), then cosine decay to zero."""
    warm = max(1, min(500, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay.

    Averaged weights are the standard choice for sampling diffusion and flow models (the last
    iterate jitters with the gradient noise); the warm-up ((1+n)/(10+n)) keeps a short run from
    averaging in its random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def train_expert(
    spec: ExpertSpec,
    images: torch.Tensor,
    steps: int,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    device: str = "cpu",
    num_threads: int | None = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train one expert on one cluster's images (N, C, H, W) with flow matching; returns it.

    AdamW with warm-up + cosine decay; the returned model is the EMA of the weights (set
    ``ema_decay=0`` for the last iterate), in eval mode on ``device``. ``num_threads=1`` because
    several experts or nodes share small machines (LIBP2P-NOTES.md: 2 cores, contended); pass
    ``None`` to leave torch's setting alone. Fully determined by ``seed`` on a given machine.
    ``on_step(step, loss)`` is called after every step (progress reports, early stop by raising).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty (N, C, H, W) tensor")
    image_shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build(image_shape).to(device)
    data = images.to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMA(model, ema_decay) if ema_decay > 0 else None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(data.shape[0], (batch,), generator=gen, device=device)
        loss = flow_matching_loss(model, data[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        if on_step is not None:
            on_step(step, loss.item())
    return ema.model if ema is not None else model.eval()


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (``noise``) to t = 1 in ``steps`` Euler steps."""
    x = noise.clone()
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device)
        x = x + dt * velocity(x, t)
    return x
