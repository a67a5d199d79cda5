"""The router: learns clusters from noised samples, sharpens with temperature, stays cheap."""

from __future__ import annotations

import pytest
import torch

from gossamer.training.diffusion import (
    Router,
    router_accuracy,
    router_from_bytes,
    router_steps_for_budget,
    router_to_bytes,
    train_router,
    training_flops,
)

SHAPE = (1, 4, 4)


def two_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright-left vs bright-right 4×4 images with a little jitter; 3:1 class balance."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.25).long()
    images = torch.full((n, *SHAPE), -0.8)
    images[labels == 0, :, :, :2] = 0.8
    images[labels == 1, :, :, 2:] = 0.8
    return images + 0.05 * torch.randn(images.shape, generator=gen), labels


@pytest.fixture(scope="module")
def trained():
    images, labels = two_clusters(256, seed=0)
    return train_router(images, labels, k=2, steps=300, batch=64, seed=0, hidden=32, depth=1)


def test_router_accuracy_rises_from_the_prior_to_certainty(trained):
    images, labels = two_clusters(400, seed=1)
    acc = router_accuracy(trained, images, labels, t_values=(0.0, 0.5, 1.0), seed=2)
    assert acc[1.0] > 0.97
    assert acc[0.5] > 0.9
    # pure noise carries no information: the best guess is the majority cluster (~75%)
    assert 0.6 < acc[0.0] < 0.9


def test_temperature_sharpens_and_probabilities_sum_to_one(trained):
    images, _ = two_clusters(64, seed=3)
    t = torch.full((64,), 0.3)
    x_t = t.reshape(-1, 1, 1, 1) * images + (1 - t.reshape(-1, 1, 1, 1)) * torch.randn_like(images)
    p1, p_half = trained.probs(x_t, t, 1.0), trained.probs(x_t, t, 0.5)
    assert torch.allclose(p1.sum(1), torch.ones(64)) and torch.allclose(
        p_half.sum(1), torch.ones(64)
    )
    assert bool((p_half.max(1).values >= p1.max(1).values - 1e-6).all())
    assert torch.equal(p1.argmax(1), p_half.argmax(1))
    with pytest.raises(ValueError):
        trained.probs(x_t, t, 0.0)


def test_router_training_is_deterministic_and_round_trips_through_safetensors(trained):
    images, labels = two_clusters(256, seed=0)
    again = train_router(images, labels, k=2, steps=300, batch=64, seed=0, hidden=32, depth=1)
    x, t = torch.randn(8, *SHAPE), torch.rand(8)
    assert torch.equal(again(x, t), trained(x, t))
    loaded = router_from_bytes(router_to_bytes(trained))
    assert torch.equal(loaded(x, t), trained(x, t))
    with pytest.raises(ValueError):
        router_from_bytes(b"\x00" * 16)


def test_budget_gives_the_most_steps_that_fit():
    router = Router(SHAPE, 4, hidden=32, depth=1)
    per_step = training_flops(router, SHAPE, 64)
    steps = router_steps_for_budget(10.5 * per_step, SHAPE, 4, batch=64, hidden=32, depth=1)
    assert steps == 10


def test_bad_labels_are_refused():
    images, labels = two_clusters(16, seed=0)
    with pytest.raises(ValueError):
        train_router(images, labels + 5, k=2, steps=1)
    with pytest.raises(ValueError):
        train_router(images, labels[:8], k=2, steps=1)
