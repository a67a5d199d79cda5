"""The partition recipe: every node that receives it must derive the same clusters."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from gossamer.training.diffusion import (
    PartitionRecipe,
    cluster_sizes,
    fit_partition,
    load_digits_split,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def recipe(digits):
    train, _ = digits
    return fit_partition(train.images, k=4, feature_dim=32, whiten=True, seed=0, n_init=4)


def test_digits_split_is_deterministic_disjoint_and_scaled(digits):
    train, held = digits
    assert len(train) == 1797 - 360 and len(held) == 360
    assert train.image_shape == (1, 8, 8)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    again_train, again_held = load_digits_split()
    assert torch.equal(again_train.images, train.images)
    assert torch.equal(again_held.labels, held.labels)
    rows = {tuple(x.flatten().tolist()) for x in held.images}
    # the digits set has a few exact duplicates; nearly all held-out images are unseen
    assert sum(tuple(x.flatten().tolist()) in rows for x in train.images) < 10
    other_train, _ = load_digits_split(seed=1)
    assert not torch.equal(other_train.images, train.images)


def test_recipe_round_trip_assigns_identically(recipe, digits):
    train, held = digits
    data = recipe.to_bytes()
    a, b = PartitionRecipe.from_bytes(data), PartitionRecipe.from_bytes(bytes(data))
    for images in (train.images, held.images):
        expected = recipe.assign(images)
        assert np.array_equal(a.assign(images), expected)
        assert np.array_equal(b.assign(images.numpy()), expected)
    assert a.digest() == b.digest() == recipe.digest()
    assert a == recipe and a.k == 4 and a.feature_dim == 32
    assert PartitionRecipe.from_dict(recipe.to_dict()) == recipe


def test_fitting_twice_with_the_same_seed_gives_the_same_recipe(recipe, digits):
    train, _ = digits
    again = fit_partition(train.images, k=4, feature_dim=32, whiten=True, seed=0, n_init=4)
    assert again.to_bytes() == recipe.to_bytes()
    other = fit_partition(train.images, k=5, feature_dim=32, whiten=True, seed=0, n_init=4)
    assert other.digest() != recipe.digest()


def test_clusters_are_numbered_largest_first_and_features_whitened(recipe, digits):
    train, _ = digits
    sizes = cluster_sizes(recipe.assign(train.images), recipe.k)
    assert sum(sizes) == len(train) and min(sizes) > 0
    assert sizes == sorted(sizes, reverse=True)
    std = recipe.features(train.images).std(axis=0, ddof=1)
    assert np.allclose(std, 1.0, atol=1e-6)
    plain = fit_partition(train.images, k=4, whiten=False, seed=0, n_init=2)
    assert np.all(plain.scales == 1.0)


def test_assign_is_nearest_centroid(recipe, digits):
    _, held = digits
    z = recipe.features(held.images)
    dist = np.linalg.norm(z[:, None, :] - recipe.centroids[None], axis=2)
    assert np.array_equal(recipe.assign(held.images), dist.argmin(axis=1))


def test_from_bytes_rejects_malformed_recipes(recipe):
    d = recipe.to_dict()
    with pytest.raises(ValueError):
        PartitionRecipe.from_bytes(recipe.to_bytes()[:-5])
    with pytest.raises(ValueError):
        PartitionRecipe.from_bytes(msgpack.packb({**d, "version": 99}))
    with pytest.raises(ValueError):
        PartitionRecipe.from_bytes(msgpack.packb({**d, "k": 5}))
    with pytest.raises(ValueError):
        PartitionRecipe.from_bytes(msgpack.packb([1, 2, 3]))
    nan = np.frombuffer(d["scales"], "<f8").copy()
    nan[0] = np.nan
    with pytest.raises(ValueError):
        PartitionRecipe.from_dict({**d, "scales": nan.tobytes()})
    with pytest.raises(ValueError):
        recipe.assign(torch.zeros(2, 1, 4, 4))
