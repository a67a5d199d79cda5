"""The router: p(cluster | x_t, t), the classifier that decides which experts denoise a sample.

It is trained with cross-entropy on noised images from the whole data set (or any labelled
sample of it — the labels are the partition's cluster ids, so a router host needs only the
recipe and some images), with the same path and t distribution the experts train on. It is small:
its training compute should stay within ~5% of the experts' (``training_flops`` lets the caller
check), because the point of the method is that the experts carry the work.

At t = 0 the input is pure noise and the best the router can do is the cluster prior; its accuracy
rises with t (calibration: 0.28 at t=0 to 0.98 at t=1). Trained routers are under-confident in
between, and sharpening with a temperature below 1 made sampling better (LIBP2P-NOTES.md), so
``probs`` takes a temperature.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from gossamer.training.diffusion.flow import flow_path, lr_at
from gossamer.training.diffusion.models import MLPVelocity, safetensors_metadata, training_flops


class Router(nn.Module):
    """Residual MLP on (x_t, t) with K logits; ``probs`` applies the temperature and softmax."""

    def __init__(
        self, image_shape: tuple[int, int, int], k: int, hidden: int = 128, depth: int = 2
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.k = k
        self.net = MLPVelocity(image_shape, hidden=hidden, depth=depth, out_dim=k)
        self.config = {"image_shape": list(image_shape), "k": k, "hidden": hidden, "depth": depth}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net.out(self.net.hidden(x_t, t))

    @torch.no_grad()
    def probs(self, x_t: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / temperature), (B, K); temperature < 1 sharpens."""
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        return torch.softmax(self(x_t, t) / temperature, dim=1)


def train_router(
    images: torch.Tensor,
    assignment: np.ndarray | torch.Tensor,
    k: int,
    steps: int,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    hidden: int = 128,
    depth: int = 2,
    device: str = "cpu",
    num_threads: int | None = 1,
) -> Router:
    """Train a router on images (N, C, H, W) labelled with cluster ids (N,); returns it (eval mode).

    Each step draws a batch of images, fresh noise and t ~ U[0, 1], forms x_t on the experts' path
    and minimises cross-entropy against the image's cluster. AdamW, warm-up + cosine.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    labels = torch.as_tensor(np.asarray(assignment), dtype=torch.long, device=device)
    if labels.shape != (images.shape[0],) or int(labels.max()) >= k or int(labels.min()) < 0:
        raise ValueError("assignment must be (N,) cluster ids in 0..K-1")
    image_shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(image_shape, k, hidden=hidden, depth=depth).to(device)
    data = images.to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-4)
    router.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(data.shape[0], (batch,), generator=gen, device=device)
        x1 = data[idx]
        x0 = torch.randn(x1.shape, generator=gen, device=device)
        t = torch.rand(batch, generator=gen, device=device)
        loss = nn.functional.cross_entropy(router(flow_path(x1, x0, t), t), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return router.eval()


@torch.no_grad()
def router_accuracy(
    router: Router,
    images: torch.Tensor,
    assignment: np.ndarray | torch.Tensor,
    t_values: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    seed: int = 0,
    repeats: int = 4,
) -> dict[float, float]:
    """Top-1 accuracy at each t on held-out images, averaged over ``repeats`` noise draws."""
    labels = torch.as_tensor(np.asarray(assignment), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out: dict[float, float] = {}
    for tv in t_values:
        correct = 0
        for _ in range(repeats):
            x0 = torch.randn(images.shape, generator=gen)
            t = torch.full((images.shape[0],), float(tv))
            correct += int((router(flow_path(images, x0, t), t).argmax(1) == labels).sum())
        out[float(tv)] = correct / (repeats * images.shape[0])
    return out


def router_steps_for_budget(
    flops: float,
    image_shape: tuple[int, int, int],
    k: int,
    batch: int = 128,
    hidden: int = 128,
    depth: int = 2,
) -> int:
    """How many router training steps of ``batch`` fit in ``flops`` (counted training FLOPs).

    The experiment passes 5% of the experts' training FLOPs: the router must stay cheap next to
    the experts, or the decentralized method stops being the cheaper one.
    """
    per_step = training_flops(Router(image_shape, k, hidden, depth), image_shape, batch)
    return int(flops // per_step)


def router_to_bytes(router: Router) -> bytes:
    """safetensors bytes of the router, its constructor arguments in the metadata (no pickle)."""
    state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    return st_save(state, metadata={"gossamer_router": json.dumps(router.config)})


def router_from_bytes(data: bytes) -> Router:
    """Rebuild a router from ``router_to_bytes`` output; strict key and shape check."""
    try:
        cfg = json.loads(safetensors_metadata(data)["gossamer_router"])
        c, h, w = (int(v) for v in cfg["image_shape"])
        router = Router((c, h, w), int(cfg["k"]), int(cfg["hidden"]), int(cfg["depth"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not gossamer router weights: {exc}") from exc
    router.load_state_dict(st_load(data), strict=True)
    return router.eval()
