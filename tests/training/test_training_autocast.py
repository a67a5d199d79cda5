"""The bf16 autocast path of the inner loop, exercised on the CPU.

On CUDA the inner loop runs its forward pass under bf16 autocast by default. That path is the same
code on every device type, so these tests force it on the CPU (``autocast=True``): the matmuls
must really run in bf16, while parameters, gradients, optimizer state and pseudo-gradients stay
fp32, and training must still make progress.
"""

from __future__ import annotations

import itertools

import torch

from gossamer.training.inner import LocalInnerLoop
from gossamer.training.model import GPT, GPTConfig
from gossamer.training.outer import pseudo_gradient

TINY = GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)


def _fixed_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, TINY.context), generator=g)
    y = torch.roll(x, -1, dims=1)
    return itertools.repeat((x, y))


def _loop(autocast: bool | None) -> tuple[GPT, LocalInnerLoop]:
    torch.set_num_threads(1)
    model = GPT(TINY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loop = LocalInnerLoop(model, opt, _fixed_batches(), lambda m, b: m.loss(*b), autocast=autocast)
    return model, loop


def _linear_output_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


def test_autocast_runs_linear_layers_in_bf16_and_keeps_fp32_state():
    model, loop = _loop(autocast=True)
    dtypes = _linear_output_dtypes(model)
    start = {k: v.detach().clone() for k, v in loop.parameters().items()}
    losses = [loop.step(s)[0] for s in range(30)]
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    for state in loop.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    delta = pseudo_gradient(start, loop.parameters())
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in delta.values())
    assert losses[-1] < 0.8 * losses[0]  # memorising one batch: progress under bf16 too


def test_autocast_defaults_off_on_cpu_and_tracks_fp32_closely():
    model32, loop32 = _loop(autocast=None)  # CPU: the default is no autocast
    dtypes = _linear_output_dtypes(model32)
    _, loop16 = _loop(autocast=True)
    for s in range(5):
        l32, tokens = loop32.step(s)
        l16, _ = loop16.step(s)
        assert tokens == 4 * TINY.context
        assert abs(l32 - l16) < 0.05 * l32  # bf16 keeps ~3 significant digits
    assert dtypes == {torch.float32}
