"""DiLoCo's use of the all-reduce, between real nodes on 127.0.0.1.

Outer steps computed across the network match the single-process reference bit for bit, and
lossy codecs with error feedback leave every member with the same bits round after round.
(Refusals of poisoned contributions and members that die or stall mid-collective are covered
by tests/training/test_collective.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trio

from gossamer.training import all_reduce
from gossamer.training.codecs import ErrorFeedback
from gossamer.training.diloco_state import unflatten
from gossamer.training.outer import (
    Contribution,
    apply_outer_step,
    init_outer_state,
    state_digest,
    weighted_average,
)

torch.set_num_threads(1)

SHAPES = {"emb": (97, 33), "w": (300, 41), "b": (41,), "scalar": ()}
NUMEL = sum(int(np.prod(s)) for s in SHAPES.values())


def _tensors(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        k: torch.from_numpy(np.asarray(rng.standard_normal(s) * scale, dtype=np.float32))
        for k, s in SHAPES.items()
    }


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


async def _mesh(nodes) -> None:
    async with trio.open_nursery() as nursery:
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                nursery.start_soon(a.connect, b.addrs()[0])


async def _reduce_all(nodes, key, vectors, weights, feedback=None, **kwargs):
    members = [n.peer_id for n in nodes]
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        ef = None if feedback is None else feedback[i]
        results[i] = await all_reduce(
            nodes[i], key, members, vectors[i], weights[i], error_feedback=ef, **kwargs
        )

    async with trio.open_nursery() as nursery:
        for i in range(len(nodes)):
            nursery.start_soon(one, i)
    return [results[i] for i in range(len(nodes))]


async def test_outer_steps_across_three_members_match_the_single_process_reference(nodes):
    """Three outer steps, each an all-reduce (codec none) then Nesterov: bit-identical to
    outer.weighted_average + apply_outer_step computed in one process."""
    async with nodes(3) as members:
        await _mesh(members)
        ids = [n.peer_id for n in members]
        tokens = [4096, 1024, 3072]
        start = _tensors(100, scale=1.0)
        ref_params, ref_state = start, init_outer_state(start)
        net = [(dict(start), init_outer_state(start)) for _ in members]
        for step in range(3):
            deltas = [_tensors(10 * step + i) for i in range(3)]
            avg = weighted_average([Contribution(ids[i], deltas[i], tokens[i]) for i in range(3)])
            ref_params, ref_state = apply_outer_step(ref_params, avg, ref_state)
            results = await _reduce_all(
                members, f"exact/{step}", [_flat(d) for d in deltas], [float(t) for t in tokens]
            )
            for i, result in enumerate(results):
                assert result.members == tuple(sorted(ids)) and result.attempts == 1
                params, state = net[i]
                net[i] = apply_outer_step(params, unflatten(result.tensor, params), state)
        want = state_digest(ref_params, ref_state)
        for params, state in net:
            assert state_digest(params, state) == want
            for name in SHAPES:
                assert torch.equal(params[name], ref_params[name])


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4"])
async def test_lossy_codecs_leave_every_member_with_the_same_bits(nodes, codec):
    async with nodes(3) as members:
        await _mesh(members)
        vectors = [_flat(_tensors(i)) for i in range(3)]
        feedback = [ErrorFeedback(codec) for _ in range(3)]
        exact = sum(vectors) / 3
        scale = exact.abs().max().item()
        # each contribution and the reduced mean are quantised once (plus the error-feedback
        # residual of the previous round): within a few quantisation steps of the exact mean
        bound = {"fp16": 2e-3, "bf16": 2e-2, "int8": 4 / 127, "int4": 4 / 7}[codec] * scale
        for r in range(2):  # round 2 carries round 1's residuals
            results = await _reduce_all(
                members, f"lossy/{r}", vectors, [1.0] * 3, codec=codec, feedback=feedback
            )
            for result in results[1:]:
                assert torch.equal(result.tensor, results[0].tensor)
            assert (results[0].tensor - exact).abs().max().item() <= bound
        assert all("flat" in f.residuals for f in feedback)
