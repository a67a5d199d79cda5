"""A small byte-level GPT, nanoGPT-style, readable top to bottom.

This is the model the DiLoCo calibration runs use (see LIBP2P-NOTES.md, "Calibration runs"):
vocabulary 256 (raw bytes, so no tokenizer to ship or agree on), 4 layers, d_model 128, 4 heads,
context 128, biases on and the output head tied to the token embedding: 842,496 parameters.

Initialisation is a pure function of a seed, so two peers that build ``GPT(config, seed=s)`` hold
bit-identical weights without exchanging them. That takes care: ``torch.randn`` is *not* portable
(its CPU kernel gives different bits under ``ATEN_CPU_CAPABILITY=default`` and ``avx2``, measured
with torch 2.13), so weights come from ``portable_normal``: integers from a private
``torch.Generator`` (integer sampling is the same on every CPU) turned into approximately normal
values with exactly rounded float64 arithmetic only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "init_weights", "portable_normal"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; every field is part of what peers must agree on."""

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    bias: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        for field in ("vocab_size", "n_layer", "n_head", "d_model", "context"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (b, t, d) -> (b, heads, t, d / heads)
        q = q.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over bytes.

    ``forward(idx)`` returns logits of shape (batch, time, vocab); ``loss(x, y)`` the mean
    next-byte cross-entropy in nats, which is what every eval number in gossamer reports.
    """

    def __init__(self, config: GPTConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config if config is not None else GPTConfig()
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model, bias=c.bias)
        # The head shares the embedding matrix (weight tying): fewer parameters to ship.
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        init_weights(self, seed)

    def num_params(self) -> int:
        """Distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.config.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.forward(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def portable_normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Approximately N(0, std²) fp32 samples, bit-identical on every CPU and torch build.

    Irwin-Hall with four uniforms: u_i = (k_i + ½)/2²⁴ from 24-bit random integers, then
    (Σu_i − 2)·√3·std. The u_i and their sums are exact in float64, the one multiply and the
    cast to fp32 are correctly rounded IEEE operations, so no libm or vector-width dependence
    enters. Mean 0, variance std², support ±2√3·std (a truncated bell, like trunc_normal_ init).
    """
    k = torch.randint(0, 1 << 24, (4, *shape), generator=generator, dtype=torch.int64)
    u = (k.to(torch.float64) + 0.5) / float(1 << 24)
    return ((u.sum(dim=0) - 2.0) * (std * math.sqrt(3.0))).to(torch.float32)


@torch.no_grad()
def init_weights(model: GPT, seed: int) -> None:
    """Re-initialise ``model`` deterministically from ``seed`` (GPT-2 scheme).

    Linear and embedding weights ~ N(0, 0.02) (see ``portable_normal``), residual projections
    with std 0.02/sqrt(2·n_layer), biases 0, LayerNorm weights 1. Parameters are visited in
    registration order and drawn from a private CPU generator, so the result depends on neither
    the global RNG, nor the device, nor the CPU's vector instructions.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
        elif ".ln" in name or name.startswith("ln_f"):
            p.fill_(1.0)
        else:
            std = residual_std if name.endswith("proj.weight") else 0.02
            p.copy_(portable_normal(tuple(p.shape), std, gen))
