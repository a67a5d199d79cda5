"""The owner's rules: bounded weights, and reductions a lone liar cannot steer."""

from __future__ import annotations

import math

import pytest
import torch

from gossamer.training.aggregate import (
    MEDIAN_WEIGHT_FACTOR,
    Aggregation,
    admitted_weights,
    aggregate,
)
from gossamer.training.collective_plan import reduce_piece, screen


def _honest(n: int, elems: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(elems, generator=gen)
    return {f"p{i}": base + 0.1 * torch.randn(elems, generator=gen) for i in range(n)}


def test_an_inflated_weight_is_held_to_a_small_multiple_of_an_honest_share() -> None:
    claims = {"a": 800.0, "b": 800.0, "c": 600.0, "d": 800.0, "liar": 1e15}
    admitted = admitted_weights(claims, Aggregation())
    assert admitted["liar"] == MEDIAN_WEIGHT_FACTOR * 800.0
    assert {p: admitted[p] for p in "abcd"} == {p: claims[p] for p in "abcd"}  # honest untouched
    # the recipe's bound, when the run states it, replaces the median's: honest weights stand
    recipe = admitted_weights(claims, Aggregation(max_weight=1000.0))
    assert recipe == {**claims, "liar": 1000.0}
    assert admitted_weights(claims, Aggregation(max_weight=700.0))["a"] == 700.0
    # equal weights ignore every claim
    assert set(admitted_weights(claims, Aggregation(weights="equal")).values()) == {1.0}
    # two contributors: the lower median is the honest one
    assert admitted_weights({"a": 800.0, "liar": 1e15}, Aggregation())["liar"] == 1600.0


def test_the_takeover_of_the_issue_no_longer_works() -> None:
    # one member claiming 1e15 tokens with a 50x-norm vector made the mean its own vector
    pieces = _honest(4)
    pieces["liar"] = 50 * torch.randn(512, generator=torch.Generator().manual_seed(9))
    claims = {**dict.fromkeys(_honest(4), 800.0), "liar": 1e15}
    believed = reduce_piece({p: (t, claims[p]) for p, t in pieces.items()})[0]
    assert torch.allclose(believed, pieces["liar"], atol=1e-3)  # the old behaviour
    admitted = admitted_weights(claims, Aggregation())
    honest_mean = torch.stack([pieces[p] for p in _honest(4)]).mean(0)
    for rule in ("trimmed_mean", "centered_clip"):
        out, _ = aggregate({p: (t, admitted[p]) for p, t in pieces.items()}, Aggregation(rule))
        # the liar moves the result by less than one honest member's spread would
        assert float((out - honest_mean).norm()) < float(honest_mean.norm()) * 0.5, rule
    # the screen, given the claimed weights, refuses the liar outright (norm 50x, weight 1e12x:
    # its pull on the mean is far past the screen's limit); unweighted, the old limit (100x)
    # saw only the 50x and let it through
    assert "liar" in screen(pieces, weights=claims)
    assert "liar" not in screen(pieces, limit=100.0)
    assert "liar" in screen(pieces)  # the limit is 10x now


@pytest.mark.parametrize("rule", ["trimmed_mean", "centered_clip"])
def test_robust_rules_cost_honest_contributions_little(rule: str) -> None:
    pieces = _honest(5)
    weights = dict.fromkeys(pieces, 1.0)
    mean, _ = aggregate({p: (t, 1.0) for p, t in pieces.items()}, Aggregation("mean"))
    out, total = aggregate({p: (t, weights[p]) for p, t in pieces.items()}, Aggregation(rule))
    assert total == 5.0
    spread = float(torch.stack(list(pieces.values())).std(0).norm())
    assert float((out - mean).norm()) < 0.5 * spread


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "constant"])
def test_centered_clip_bounds_what_one_of_five_can_do(attack: str) -> None:
    pieces = _honest(4)
    honest_mean = torch.stack(list(pieces.values())).mean(0)
    evil = {
        "scaled": 50 * honest_mean,
        "sign_flip": -10 * honest_mean,
        "constant": torch.full_like(honest_mean, 1e6),
    }[attack]
    pieces["evil"] = evil
    out, _ = aggregate({p: (t, 1.0) for p, t in pieces.items()}, Aggregation("centered_clip"))
    plain, _ = aggregate({p: (t, 1.0) for p, t in pieces.items()}, Aggregation("mean"))
    radius = float(torch.stack([t - honest_mean for t in _honest(4).values()]).norm(dim=1).max())
    # clipped: the liar's pull is about one radius; the plain mean is dragged all the way
    assert float((out - honest_mean).norm()) < 3 * radius
    assert float((plain - honest_mean).norm()) > 10 * float((out - honest_mean).norm())


def test_mean_is_the_reference_bits_and_few_contributors_fall_back_to_it() -> None:
    pieces = _honest(3)
    contributions = {p: (t, float(i + 1)) for i, (p, t) in enumerate(pieces.items())}
    assert torch.equal(
        aggregate(contributions, Aggregation("mean"))[0], reduce_piece(contributions)[0]
    )
    two = dict(list(contributions.items())[:2])
    for rule in ("trimmed_mean", "centered_clip"):
        assert torch.equal(aggregate(two, Aggregation(rule))[0], reduce_piece(two)[0])


def test_identical_contributions_give_themselves_back() -> None:
    x = torch.arange(16, dtype=torch.float32)
    same = {f"p{i}": (x.clone(), 1.0) for i in range(4)}
    for rule in ("trimmed_mean", "centered_clip"):
        assert torch.equal(aggregate(same, Aggregation(rule))[0], x)


def test_bad_settings_are_refused() -> None:
    for bad in (
        {"rule": "median"},
        {"weights": "claimed"},
        {"max_weight": 0.0},
        {"max_weight": math.inf},
        {"trim": 0.5},
        {"clip_iterations": 0},
    ):
        with pytest.raises(ValueError):
            Aggregation(**bad)


def test_a_run_file_bounds_weights_by_its_recipe_and_names_a_rule() -> None:
    from gossamer.training.run_file import parse_run_file

    run = parse_run_file(
        {
            "name": "r",
            "model": {"context": 64},
            "data": {"batch_size": 8},
            "diloco": {"inner_steps": 10, "aggregate": "centered_clip"},
        },
        "run.toml",
    )
    assert run.diloco.max_round_tokens == 10 * 8 * 64
    assert run.diloco.aggregation == Aggregation("centered_clip", max_weight=5120.0)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        parse_run_file({"name": "r", "diloco": {"aggregate": "median"}}, "run.toml")
