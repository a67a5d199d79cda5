"""Flow matching: the t convention, the training loop, Euler sampling, pluggable architectures."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gossamer.training.diffusion import (
    ExpertSpec,
    count_params,
    euler_sample,
    expert_from_bytes,
    expert_to_bytes,
    flow_matching_loss,
    flow_path,
    forward_flops,
    register_expert,
    registered_experts,
    train_expert,
)
from gossamer.training.diffusion.flow import lr_at

SHAPE = (1, 4, 4)


def two_modes(n: int = 256) -> torch.Tensor:
    """Half the images are all +0.5, half all −0.5."""
    images = torch.full((n, *SHAPE), 0.5)
    images[n // 2 :] = -0.5
    return images


def test_path_runs_from_noise_at_t0_to_data_at_t1():
    x1, x0 = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    assert torch.equal(flow_path(x1, x0, torch.zeros(3)), x0)
    assert torch.equal(flow_path(x1, x0, torch.ones(3)), x1)
    mid = flow_path(x1, x0, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(mid[1], (x0[1] + x1[1]) / 2)
    assert torch.allclose(mid[2], 0.75 * x1[2] + 0.25 * x0[2])


def test_loss_target_is_data_minus_noise():
    class Oracle(nn.Module):
        """Knows the data is a single point c: the exact velocity is (c − x_t) / (1 − t)."""

        def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return (0.3 - x_t) / (1 - t).reshape(-1, 1, 1, 1)

    x1 = torch.full((64, *SHAPE), 0.3)
    exact = flow_matching_loss(Oracle(), x1, torch.Generator().manual_seed(0))
    zero = flow_matching_loss(
        lambda x, t: torch.zeros_like(x), x1, torch.Generator().manual_seed(0)
    )
    assert float(exact) < 1e-8 < float(zero)


def test_euler_with_the_exact_velocity_lands_on_the_data():
    target = torch.full(SHAPE, -0.4)
    noise = torch.randn(16, *SHAPE)
    out = euler_sample(lambda x, t: (target - x) / (1 - t).reshape(-1, 1, 1, 1), noise, steps=7)
    assert torch.allclose(out, target.expand_as(out), atol=1e-5)


def test_a_trained_expert_generates_both_modes():
    losses: list[float] = []
    spec = ExpertSpec("mlp", {"hidden": 64, "depth": 1})
    model = train_expert(spec, two_modes(), steps=400, batch=64, lr=3e-3, seed=0,
                         on_step=lambda step, loss: losses.append(loss))  # fmt: skip
    assert len(losses) == 400
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50
    out = euler_sample(model, torch.randn(200, *SHAPE, generator=torch.Generator().manual_seed(1)))
    means = out.mean((1, 2, 3))
    assert float((means - 0.5 * means.sign()).abs().mean()) < 0.15  # near one of the two modes
    assert 0.3 < float((means > 0).float().mean()) < 0.7  # and both modes are used


def test_training_is_deterministic_for_a_seed():
    spec = ExpertSpec("mlp", {"hidden": 16, "depth": 1})
    a = train_expert(spec, two_modes(), steps=20, batch=8, seed=5)
    b = train_expert(spec, two_modes(), steps=20, batch=8, seed=5)
    c = train_expert(spec, two_modes(), steps=20, batch=8, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 1000, 1.0) for s in range(1000)]
    assert lrs[0] == pytest.approx(1 / 50) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 1e-4 and all(a >= b for a, b in itertools.pairwise(lrs[50:]))


class Tiny(nn.Module):
    """A user-supplied architecture: per-pixel affine map plus a time term."""

    def __init__(self, image_shape: tuple[int, int, int], scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full(image_shape, scale))
        self.time = nn.Linear(1, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.weight * x_t + self.time(t.reshape(-1, 1)).reshape(-1, 1, 1, 1)


def test_users_plug_in_their_own_architecture():
    register_expert("test-tiny", Tiny)
    assert {"mlp", "unet", "test-tiny"} <= set(registered_experts())
    spec = ExpertSpec("test-tiny", {"scale": 0.5})
    model = train_expert(spec, two_modes(), steps=5, batch=8)
    assert isinstance(model, Tiny) and count_params(model) == 16 + 2
    with pytest.raises(KeyError):
        ExpertSpec("no-such-architecture").build(SHAPE)


@pytest.mark.parametrize("spec", [ExpertSpec("mlp"), ExpertSpec("unet", {"base": 8})])
def test_builtin_experts_round_trip_through_safetensors(spec):
    shape = (1, 8, 8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = spec.build(shape).eval()
    x, t = torch.randn(5, *shape), torch.rand(5)
    assert model(x, t).shape == x.shape
    loaded, loaded_spec, loaded_shape = expert_from_bytes(expert_to_bytes(model, spec, shape))
    assert loaded_spec == spec and loaded_shape == shape
    assert torch.equal(loaded(x, t), model(x, t))
    data = bytearray(expert_to_bytes(model, spec, shape))
    with pytest.raises(ValueError):
        expert_from_bytes(bytes(data[:4]))


def test_flop_count_of_the_mlp_is_twice_its_matmul_weights():
    model = ExpertSpec("mlp").build((1, 8, 8))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert forward_flops(model, (1, 8, 8)) == 2 * weights
    assert count_params(model) == 182_848


def test_every_name_on_the_package_surface_resolves():
    import gossamer.training.diffusion as ddm

    for name in ddm.__all__:
        assert getattr(ddm, name) is not None, name
    with pytest.raises(AttributeError):
        ddm.no_such_name  # noqa: B018
