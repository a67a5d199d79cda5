"""Outer step: parity with torch's Nesterov SGD, bit-determinism, weighting, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gossamer.training.outer import (
    Contribution,
    OuterState,
    apply_outer_step,
    init_outer_state,
    pseudo_gradient,
    state_digest,
    weighted_average,
)

torch.set_num_threads(1)

SHAPES = {"blocks.0.w": (64, 33), "blocks.0.b": (33,), "emb": (17, 5), "scale": ()}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def _parity(nesterov: bool) -> dict:
    """The same trajectory through torch.optim.SGD and through apply_outer_step.

    Inputs come from numpy's generator, not torch.randn: torch's normal_ kernel itself gives
    different bits under different CPU capabilities, and both sides must see the same inputs.
    """
    rng = np.random.default_rng(0)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    shapes = {"a": (300, 37), "b": (513,), "c": ()}
    params = {k: randn(s) for k, s in shapes.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=0.7, momentum=0.9, nesterov=nesterov)
    state = init_outer_state(params, nesterov=nesterov)
    mine, equal, worst = params, True, 0.0
    for _ in range(6):
        grad = {k: randn(s) * 0.01 for k, s in shapes.items()}
        for k, p in leaves.items():
            p.grad = grad[k].clone()
        opt.step()
        mine, state = apply_outer_step(mine, grad, state)
        for k in shapes:
            theirs = leaves[k].detach()
            equal = equal and torch.equal(mine[k], theirs)
            worst = max(worst, float((mine[k] - theirs).abs().max()))
    return {"equal": equal, "worst": worst, "digest": state_digest(mine, state)}


def test_outer_step_equals_torch_sgd_nesterov_bit_for_bit_and_is_cpu_independent() -> None:
    # With ATEN_CPU_CAPABILITY=default torch's kernels do not fuse multiply-adds, so
    # torch.optim.SGD(nesterov=True) rounds exactly like apply_outer_step: equal bit for bit.
    # Our own result must be the same bits on this CPU's native (AVX2/AVX-512) kernels, in this
    # process, where torch's SGD itself may differ in the last bit because it uses FMA.
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); import {Path(__file__).stem} as t; "
        "import torch; torch.set_num_threads(1); print(json.dumps(t._parity(True)))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pinned = json.loads(out.stdout.strip().splitlines()[-1])
    assert pinned["equal"], pinned
    native = _parity(True)
    assert native["digest"] == pinned["digest"]
    assert native["worst"] < 1e-6  # torch with FMA: at most last-bit differences


def test_outer_step_matches_torch_sgd_in_process() -> None:
    # Same trajectory in this process (torch's native kernels): equal up to FMA rounding, and the
    # plain-momentum path too.
    for nesterov in (True, False):
        g = torch.Generator().manual_seed(1)
        params = _tensors(2)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.SGD(list(leaves.values()), lr=0.7, momentum=0.9, nesterov=nesterov)
        state = init_outer_state(params, nesterov=nesterov)
        mine = params
        for _ in range(4):
            grad = {k: torch.randn(s, generator=g) * 0.01 for k, s in SHAPES.items()}
            for k, p in leaves.items():
                p.grad = grad[k].clone()
            opt.step()
            mine, state = apply_outer_step(mine, grad, state)
        for k in SHAPES:
            torch.testing.assert_close(mine[k], leaves[k].detach(), rtol=0, atol=2e-6)
        assert state.step == 4


def test_outer_step_is_pure_and_repeatable() -> None:
    params, grad = _tensors(0), _tensors(1, 0.01)
    state = init_outer_state(params)
    before = state_digest(params, state), state_digest(grad)
    p1, s1 = apply_outer_step(params, grad, state)
    p2, s2 = apply_outer_step(params, grad, state)
    assert (state_digest(params, state), state_digest(grad)) == before
    assert state_digest(p1, s1) == state_digest(p2, s2)
    assert state_digest(p1, s1) != state_digest(params, state)
    # first step: momentum buffer is the gradient itself (as in torch), then accumulates
    assert torch.equal(s1.momentum_buffers["emb"], grad["emb"])
    _, s3 = apply_outer_step(p1, grad, s1)
    assert s3.step == 2
    assert torch.equal(s3.momentum_buffers["emb"], grad["emb"] * 0.9 + grad["emb"])


def test_outer_state_checks() -> None:
    params, grad = _tensors(0), _tensors(1, 0.01)
    state = init_outer_state(params, lr=0.5, momentum=0.8)
    with pytest.raises(ValueError):
        init_outer_state(params, lr=0.0)
    with pytest.raises(ValueError):
        init_outer_state(params, momentum=1.0)
    with pytest.raises(ValueError, match="fp32"):
        apply_outer_step({k: v.double() for k, v in params.items()}, grad, state)
    with pytest.raises(ValueError, match="names"):
        apply_outer_step({"x": torch.zeros(1)}, grad, state)


def test_pseudo_gradient_is_start_minus_local_in_fp32() -> None:
    start = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    local = {"w": torch.tensor([0.5, 3.0])}
    delta = pseudo_gradient(start, local)
    assert delta["w"].dtype == torch.float32
    assert delta["w"].tolist() == [0.5, -1.0]
    with pytest.raises(ValueError):
        pseudo_gradient(start, {"v": torch.zeros(2)})
    with pytest.raises(ValueError):
        pseudo_gradient(start, {"w": torch.zeros(3)})


def test_weighted_average_weights_by_tokens() -> None:
    a = Contribution("peer-a", {"w": torch.ones(4)}, tokens=1)
    b = Contribution("peer-b", {"w": torch.full((4,), 5.0)}, tokens=3)
    assert weighted_average([a, b])["w"].tolist() == [4.0] * 4  # (1·1 + 3·5) / 4
    assert weighted_average([a._replace(tokens=3), b])["w"].tolist() == [3.0] * 4
    assert weighted_average([b])["w"].tolist() == [5.0] * 4


def test_weighted_average_is_bit_identical_in_any_arrival_order() -> None:
    contribs = [
        Contribution(f"peer-{i}", _tensors(10 + i, 10.0 ** (i - 2)), tokens=1000 + 37 * i)
        for i in range(6)
    ]
    reference = state_digest(weighted_average(contribs))
    for perm in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3], [1, 3, 5, 0, 2, 4]):
        assert state_digest(weighted_average([contribs[i] for i in perm])) == reference

    # ...which matters: a naive sum in arrival order does depend on the order.
    def naive(cs: list[Contribution]) -> torch.Tensor:
        total = sum(c.tokens for c in cs)
        acc = torch.zeros(SHAPES["blocks.0.w"])
        for c in cs:
            acc += c.tensors["blocks.0.w"] * (c.tokens / total)
        return acc

    assert not torch.equal(naive(contribs), naive(contribs[::-1]))


def test_weighted_average_refuses_bad_input() -> None:
    a = Contribution("a", {"w": torch.ones(2)}, 1)
    with pytest.raises(ValueError):
        weighted_average([])
    with pytest.raises(ValueError, match="duplicate"):
        weighted_average([a, a])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a._replace(tokens=0)])
    with pytest.raises(ValueError, match="names"):
        weighted_average([a, Contribution("b", {"v": torch.ones(2)}, 1)])


def test_state_digest_is_canonical_and_sees_every_bit() -> None:
    params = _tensors(0)
    state = init_outer_state(params)
    d = state_digest(params, state)
    assert d == state_digest(dict(reversed(list(params.items()))), state)
    assert len(d) == 64
    flipped = dict(params)
    flipped["scale"] = -params["scale"]
    assert state_digest(flipped, state) != d
    zero = {"x": torch.tensor([0.0])}
    assert state_digest(zero) != state_digest({"x": torch.tensor([-0.0])})
    assert state_digest(zero) != state_digest({"y": torch.tensor([0.0])})
    assert state_digest(zero) != state_digest({"x": torch.tensor([0.0], dtype=torch.float64)})
    assert state_digest(params) != d
    for change in ({"step": 1}, {"lr": 0.7000001}, {"momentum": 0.95}, {"nesterov": False}):
        other = OuterState(**{**state.__dict__, **change})
        assert state_digest(params, other) != d, change
