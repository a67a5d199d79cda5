"""Routing math (exact, by hand), request plans, dead experts, and the sampler end to end."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.training.diffusion import (
    ComparisonConfig,
    ExpertSpec,
    ExpertUnavailable,
    NoExpertForRows,
    RoutingMode,
    combine,
    decode_png,
    plan_requests,
    routing_weights,
    run_local_comparison,
    sample,
    sample_by_prior,
    split_steps,
)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])


def constant_velocities(b: int = 3) -> dict[int, torch.Tensor]:
    """Expert e answers the constant e + 1 for every row: combined values are weighted means."""
    return {e: torch.full((b, 2), float(e + 1)) for e in range(4)}


def test_top2_matches_hand_computation():
    v = combine(PROBS, constant_velocities(), "top2")
    expected = [
        (0.5 * 1 + 0.3 * 2) / 0.8,  # experts 0, 1
        (0.3 * 3 + 0.4 * 4) / 0.7,  # experts 2, 3
        (0.25 * 1 + 0.25 * 2) / 0.5,  # a four-way tie goes to the lowest ids
    ]
    assert torch.allclose(v[:, 0], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(v[:, 1], v[:, 0])


def test_top1_and_full_match_hand_computation():
    assert combine(PROBS, constant_velocities(), "top1")[:, 0].tolist() == [1.0, 4.0, 1.0]
    full = combine(PROBS, constant_velocities(), "full")[:, 0]
    expected = [0.5 + 0.6 + 0.45 + 0.2, 0.1 + 0.4 + 0.9 + 1.6, 2.5]
    assert torch.allclose(full, torch.tensor(expected), atol=1e-6)


def test_plan_requests_lists_only_needed_rows():
    plan = plan_requests(PROBS, "top2")
    assert {e: rows.tolist() for e, rows in plan.items()} == {
        0: [0, 2],
        1: [0, 2],
        2: [1],
        3: [1],
    }
    assert set(plan_requests(PROBS, "top1")) == {0, 3}
    assert all(r.tolist() == [0, 1, 2] for r in plan_requests(PROBS, "full").values())


def test_combine_accepts_planned_rows_or_the_whole_batch():
    plan = plan_requests(PROBS, "top2")
    full = constant_velocities()
    subset = {e: full[e][rows] * 1.0 for e, rows in plan.items()}
    assert torch.equal(combine(PROBS, subset, "top2"), combine(PROBS, full, "top2"))
    with pytest.raises(ValueError):
        combine(PROBS, {0: torch.zeros(1, 2), 1: torch.zeros(2, 2)}, "top2")


def test_an_expert_that_did_not_answer_is_dropped_and_weights_renormalised():
    answered = constant_velocities()
    del answered[0]
    v = combine(PROBS, answered, "top2")
    assert v[0, 0] == pytest.approx(2.0)  # row 0 asked 0 and 1: only 1 answered
    assert v[1, 0] == pytest.approx((0.3 * 3 + 0.4 * 4) / 0.7)
    full = combine(PROBS, answered, "full")
    assert full[0, 0] == pytest.approx((0.3 * 2 + 0.15 * 3 + 0.05 * 4) / 0.5)
    del answered[1]
    with pytest.raises(NoExpertForRows) as info:
        combine(PROBS, answered, "top2")
    assert info.value.rows.tolist() == [0, 2]


def test_experts_known_dead_are_skipped_at_planning():
    w = routing_weights(PROBS, "top2", available={1, 2, 3})
    assert w[0].tolist() == pytest.approx([0.0, 0.3 / 0.45, 0.15 / 0.45, 0.0])
    plan = plan_requests(PROBS, "top1", available={1, 2})
    assert {e: r.tolist() for e, r in plan.items()} == {1: [0, 2], 2: [1]}
    with pytest.raises(NoExpertForRows):
        plan_requests(PROBS, "top1", available=set())


def test_routing_mode_parsing():
    assert RoutingMode.parse("top3") == RoutingMode("top", 3)
    assert str(RoutingMode.parse("full")) == "full"
    for bad in ("top0", "top", "best", "TOP1"):
        with pytest.raises(ValueError):
            RoutingMode.parse(bad)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.sampled_from(["top1", "top2", "top3", "full"]),
    st.integers(0, 2**31 - 1),
)
def test_weights_are_a_renormalised_top_k_of_the_probabilities(b, k, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(b, k, generator=gen), dim=1)
    w = routing_weights(probs, mode)
    assert torch.allclose(w.sum(1), torch.ones(b), atol=1e-6)
    assert bool((w >= 0).all())
    m = RoutingMode.parse(mode)
    keep = k if m.kind == "full" else min(m.k, k)
    assert bool(((w > 0).sum(1) <= keep).all())
    # the kept experts are the most probable ones, proportionally weighted
    top = probs.topk(keep, dim=1).values.sum(1, keepdim=True)
    kept = w > 0
    assert torch.allclose(w[kept], (probs / top)[kept], atol=1e-5)
    values = torch.randn(k, generator=gen)
    v = combine(probs, {e: values[e].expand(b, 1) for e in range(k)}, mode)
    assert torch.allclose(v[:, 0], w @ values, atol=1e-5)


# Two point masses: the exact velocities and posterior are known in closed form, so a correct
# sampler must put every sample on one of them, in the prior's proportions.
MU = torch.stack([torch.full((1, 2, 2), 0.7), torch.full((1, 2, 2), -0.7)])
PRIOR = torch.tensor([0.25, 0.75])


def point_mass_expert(e: int):
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (MU[e] - x) / (1 - t).reshape(-1, 1, 1, 1)

    return velocity


def exact_posterior(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.reshape(-1, 1)
    sq = torch.stack([((x - tt[:, :, None, None] * MU[e]) ** 2).flatten(1).sum(1) for e in (0, 1)])
    logits = torch.log(PRIOR)[:, None] - sq / (2 * (1 - tt.T) ** 2)
    return torch.softmax(logits.T, dim=1)


def test_full_routing_with_exact_experts_reproduces_the_mixture():
    experts = {e: point_mass_expert(e) for e in (0, 1)}
    x = sample(exact_posterior, experts, 2000, steps=40, mode="full", seed=3, image_shape=(1, 2, 2))
    near = torch.stack([(x - MU[e]).flatten(1).norm(dim=1) for e in (0, 1)])
    assert float(near.min(0).values.max()) < 1e-3  # every sample landed on a point mass
    assert abs(float((near[0] < near[1]).float().mean()) - 0.25) < 0.04
    prior = sample_by_prior(experts, [1, 3], torch.randn(2000, 1, 2, 2), steps=10, seed=1)
    assert abs(float((prior.mean((1, 2, 3)) > 0).float().mean()) - 0.25) < 0.04


@pytest.mark.parametrize("sticky_from", [0.0, 0.5])
def test_sticky_routing_with_exact_experts_reproduces_the_mixture(sticky_from):
    calls = {0: 0, 1: 0}

    def counting(e: int):
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls[e] += x.shape[0]
            return point_mass_expert(e)(x, t)

        return velocity

    experts = {e: counting(e) for e in (0, 1)}
    x = sample(exact_posterior, experts, 2000, steps=40, mode="full", seed=3,
               image_shape=(1, 2, 2), sticky_from=sticky_from)  # fmt: skip
    near = torch.stack([(x - MU[e]).flatten(1).norm(dim=1) for e in (0, 1)])
    assert float(near.min(0).values.max()) < 1e-3
    assert abs(float((near[0] < near[1]).float().mean()) - 0.25) < 0.04
    full_steps = round(40 * sticky_from)  # both experts see every row before the switch
    assert calls[0] + calls[1] == 2000 * (2 * full_steps + (40 - full_steps))


def test_sticky_rows_redraw_when_their_expert_dies():
    state = {"steps": 0}

    def dies_after_three_steps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        state["steps"] += 1
        if state["steps"] > 3:
            raise ExpertUnavailable("peer left")
        return point_mass_expert(0)(x, t)

    experts = {0: dies_after_three_steps, 1: point_mass_expert(1)}
    x = sample(exact_posterior, experts, 200, steps=10, seed=0, image_shape=(1, 2, 2),
               sticky_from=0.0)  # fmt: skip
    assert torch.allclose(x, MU[1].expand_as(x), atol=1e-4)


def test_top1_routing_collapses_towards_the_larger_cluster():
    # At t = 0 the exact posterior is the prior, so argmax sends every row to the larger cluster
    # and only rows that drift far enough switch later: the small cluster is under-sampled. This
    # is the failure the calibration measured, and why "full" is the default mode.
    experts = {e: point_mass_expert(e) for e in (0, 1)}
    x = sample(exact_posterior, experts, 2000, steps=40, mode="top1", seed=3, image_shape=(1, 2, 2))
    near = torch.stack([(x - MU[e]).flatten(1).norm(dim=1) for e in (0, 1)])
    assert float(near.min(0).values.max()) < 1e-3
    assert float((near[0] < near[1]).float().mean()) < 0.15


def test_sampling_survives_a_dead_expert_and_fails_when_all_are_dead():
    calls: dict[int, int] = {0: 0, 1: 0}

    def dead(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        raise ExpertUnavailable("peer left")

    def alive(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[1] += 1
        return point_mass_expert(1)(x, t)

    x = sample(exact_posterior, {0: dead, 1: alive}, 64, steps=8, mode="top1", seed=0,
               image_shape=(1, 2, 2))  # fmt: skip
    assert torch.allclose(x, MU[1].expand_as(x), atol=1e-4)
    assert calls[0] == 1  # dropped after its first failure, never asked again
    assert calls[1] == 8 + 1  # every step, plus the re-planned rows of the failed step
    with pytest.raises(NoExpertForRows):
        sample(exact_posterior, {0: dead}, 4, steps=2, seed=0, image_shape=(1, 2, 2))


def test_a_bug_in_an_expert_is_not_mistaken_for_a_dead_peer():
    def broken(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        sample(exact_posterior, {0: broken, 1: broken}, 4, steps=2, image_shape=(1, 2, 2))


def test_split_steps_is_proportional_and_exact():
    assert split_steps(1000, [451, 448, 373, 165]) == [314, 312, 259, 115]
    for total in (1, 7, 999, 5000):
        steps = split_steps(total, [5, 3, 3, 1])
        assert sum(steps) == total
        assert all(abs(s - total * n / 12) < 1 for s, n in zip(steps, [5, 3, 3, 1], strict=True))


def test_local_comparison_runs_end_to_end_and_reports_every_figure(tmp_path):
    cfg = ComparisonConfig(
        grid_dir=str(tmp_path),
        total_steps=40, batch=32, n_samples=120, sample_steps=4, classifier_steps=150,
        expert=ExpertSpec("mlp", {"hidden": 32, "depth": 1}), router_hidden=16, router_depth=1,
    )  # fmt: skip
    r = run_local_comparison(cfg)
    for key in ("top1", "top2", "full"):
        assert math.isfinite(r[f"fd_ensemble_{key}"]) and r[f"fd_ensemble_{key}"] > 0
    assert math.isfinite(r["fd_monolith"]) and r["fd_real"] < r["fd_monolith"]
    assert sum(r["expert_steps"]) == 40
    assert 0 < r["router_flops_fraction"] <= 0.05
    assert 0 <= r["confident_ensemble_full"] <= 1 and r["classifier_accuracy"] > 0.5
    grid = decode_png((tmp_path / "seed0_ensemble_sticky.png").read_bytes())
    assert grid.shape == (4 * (10 * 9 + 1), 4 * (10 * 9 + 1))  # 10×10 digits of 8 px, ×4
