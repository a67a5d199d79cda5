"""Expert architectures: a registry of velocity networks ``forward(x_t, t) -> velocity``.

An expert is named by an ``ExpertSpec`` — a registered architecture name plus JSON-able keyword
arguments — so a run document can say what every node must build, and a peer can rebuild an
expert from its weights (safetensors bytes whose metadata carries the spec). SDK users plug in
their own ``nn.Module`` with ``register_expert("name", factory)``; the factory is called as
``factory(image_shape, **kwargs)`` and the module must map x_t (B, C, H, W) and t (B,) in [0, 1]
to a velocity shaped like x_t.

Built in: ``"mlp"`` (residual MLP on the flattened image, ~182k parameters on 8×8 grey at the
defaults, the calibration's size) and ``"unet"`` (a two-level conv U-Net; convolutions share
weights across positions, so it spends its parameters on shape rather than on absolute pixels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

ExpertFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ExpertFactory] = {}


def register_expert(
    name: str, factory: ExpertFactory | None = None
) -> ExpertFactory | Callable[[ExpertFactory], ExpertFactory]:
    """Register ``factory(image_shape, **kwargs) -> nn.Module`` under ``name``.

    Usable directly (``register_expert("mine", make_mine)``) or as a decorator
    (``@register_expert("mine")``). Re-registering a name replaces it, so notebooks can iterate.
    """

    def add(f: ExpertFactory) -> ExpertFactory:
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def registered_experts() -> list[str]:
    """Names ``ExpertSpec`` can refer to."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ExpertSpec:
    """An architecture name from the registry and its keyword arguments (JSON-able values)."""

    name: str = "mlp"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, image_shape: tuple[int, int, int]) -> nn.Module:
        """Instantiate the architecture for images of shape (C, H, W)."""
        try:
            factory = _REGISTRY[self.name]
        except KeyError:
            raise KeyError(
                f"no expert architecture {self.name!r}; registered: {registered_experts()}"
            ) from None
        return factory(tuple(image_shape), **dict(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for msgpack/JSON (the run document, safetensors metadata)."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpertSpec:
        """Inverse of ``to_dict``."""
        name, kwargs = d.get("name"), d.get("kwargs", {})
        if not isinstance(name, str) or not isinstance(kwargs, Mapping):
            raise ValueError("malformed expert spec")
        return cls(name, dict(kwargs))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t ∈ [0, 1] followed by a linear layer and SiLU."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * 1000.0, persistent=False)
        self.proj = nn.Sequential(nn.Linear(2 * half, out), nn.SiLU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float().reshape(-1, 1) * self.freqs
        return self.proj(torch.cat([torch.sin(args), torch.cos(args)], dim=1))


class MLPVelocity(nn.Module):
    """Residual MLP on the flattened image, with the time embedding added to the hidden state."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden: int = 256,
        depth: int = 2,
        time_dim: int = 64,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        d = math.prod(image_shape)
        self.image_shape = tuple(image_shape)
        self.time = TimeEmbedding(time_dim, hidden)
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim or d)

    def hidden(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t.flatten(1)) + self.time(t)
        for block in self.blocks:
            h = h + block(h)
        return torch.nn.functional.silu(self.norm(h))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x_t, t)).reshape(x_t.shape)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """Two-resolution U-Net (H×W and H/2×W/2) with a skip connection; H and W must be even."""

    def __init__(self, image_shape: tuple[int, int, int], base: int = 32, time_dim: int = 64):
        super().__init__()
        c, h, w = image_shape
        if h % 2 or w % 2:
            raise ValueError("TinyUNet needs even image height and width")
        tdim = 2 * base
        self.time = TimeEmbedding(time_dim, tdim)
        self.inc = nn.Conv2d(c, base, 3, padding=1)
        self.down = _ResBlock(base, base, tdim)
        self.pool = nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * base, 2 * base, tdim)
        self.mid2 = _ResBlock(2 * base, 2 * base, tdim)
        self.upconv = nn.Conv2d(2 * base, base, 3, padding=1)
        self.up = _ResBlock(2 * base, base, tdim)
        self.out = nn.Sequential(
            nn.GroupNorm(min(8, base), base), nn.SiLU(), nn.Conv2d(base, c, 3, padding=1)
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)
        skip = self.down(self.inc(x_t), temb)
        h = self.mid2(self.mid1(self.pool(skip), temb), temb)
        h = self.upconv(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up(torch.cat([h, skip], dim=1), temb)
        return self.out(h)


register_expert("mlp", MLPVelocity)
register_expert("unet", TinyUNet)


def count_params(model: nn.Module) -> int:
    """Number of parameters (frozen ones too: an EMA copy has requires_grad off)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs for one image, counted by torch's FLOP counter (matmuls and convolutions).

    Training costs about 3× this per example (forward + backward); compute budgets in this package
    (router ≤ 5% of the experts) are stated in these counted FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *image_shape))
    t = torch.full((1,), 0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())


def training_flops(model: nn.Module, image_shape: tuple[int, int, int], examples: int) -> int:
    """≈ 3 × forward FLOPs × examples seen (forward + backward) — the budget currency."""
    return 3 * forward_flops(model, image_shape) * examples


def expert_to_bytes(model: nn.Module, spec: ExpertSpec, image_shape: tuple[int, int, int]) -> bytes:
    """safetensors bytes of the weights, with the spec and image shape in the metadata.

    This is what travels between nodes or sits on disk: no pickle, and the receiver learns what
    to build before it touches a tensor.
    """
    meta = {"gossamer": json.dumps({"spec": spec.to_dict(), "image_shape": list(image_shape)})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state, metadata=meta)


def expert_from_bytes(data: bytes) -> tuple[nn.Module, ExpertSpec, tuple[int, int, int]]:
    """Rebuild an expert from ``expert_to_bytes`` output; strict key and shape check."""
    try:
        info = json.loads(safetensors_metadata(data)["gossamer"])
        spec = ExpertSpec.from_dict(info["spec"])
        c, h, w = (int(v) for v in info["image_shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"expert weights without a valid gossamer spec: {exc}") from exc
    model = spec.build((c, h, w))
    model.load_state_dict(st_load(data), strict=True)
    return model.eval(), spec, (c, h, w)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` map of safetensors bytes, read before any tensor is built."""
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if header_len < 2 or header_len > len(data) - 8:
        raise ValueError("not safetensors data")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("safetensors data without metadata")
    return meta
