"""The all-reduce between real nodes on 127.0.0.1: exact outer-step math, refusals, dropouts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import trio

from gossamer.training.codecs import ErrorFeedback, get_codec
from gossamer.training.collective import CollectiveError, all_reduce
from gossamer.training.diloco import unflatten
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


class _UncheckedNone:
    """A peer that skips its own finiteness check (a bug or an attacker): sends raw fp32."""

    def __init__(self) -> None:
        self._inner = get_codec("none")
        self.name = "none"

    def encode(self, tensor):
        from gossamer.training.codecs import EncodedTensor

        flat = tensor.detach().float().contiguous().reshape(-1)
        return EncodedTensor("none", tuple(tensor.shape), "float32", (flat.view(torch.uint8),))

    def decode(self, encoded, **kw):
        return encoded.buffers[0].clone().view(torch.float32).reshape(encoded.shape)

    def buffer_sizes(self, numel):
        return self._inner.buffer_sizes(numel)


async def test_poisoned_pseudo_gradients_are_refused_with_a_log_line(nodes, caplog):
    """Three honest members, one sending NaN/Inf, one sending a finite vector a million times
    too large: both are refused by every honest owner (with a log line naming them and why)
    and dropped; the honest three average exactly their own contributions."""
    caplog.set_level(logging.WARNING, logger="gossamer.training.collective")
    async with nodes(5, dial_timeout=2.0) as members:
        await _mesh(members)
        vectors = [_flat(_tensors(i)) for i in range(5)]
        vectors[3][::997] = float("nan")  # in every owner's part
        vectors[3][5::997] = float("inf")
        vectors[4] *= 1e6
        ids = [n.peer_id for n in members]
        outcome: dict[int, object] = {}

        async def one(i: int) -> None:
            codec = "none" if i < 3 else _UncheckedNone()
            try:
                outcome[i] = await all_reduce(
                    members[i], "poison", ids, vectors[i], 100.0, codec=codec, phase_timeout=2.0
                )
            except CollectiveError as exc:
                outcome[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
        want = weighted_average([Contribution(ids[i], {"x": vectors[i]}, 100) for i in range(3)])
        for i in range(3):
            result = outcome[i]
            assert result.members == tuple(sorted(ids[:3]))  # type: ignore[union-attr]
            assert torch.equal(result.tensor, want["x"])  # type: ignore[union-attr]
            assert {ids[3], ids[4]} <= set(result.refused)  # type: ignore[union-attr]
        assert isinstance(outcome[3], CollectiveError) and isinstance(outcome[4], CollectiveError)
        lines = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
        assert any(ids[3][-8:] in line and "non-finite" in line for line in lines), lines
        assert any(ids[4][-8:] in line and "× the median" in line for line in lines), lines


async def test_a_member_that_stalls_mid_collective_is_dropped_and_the_rest_complete(nodes):
    async with nodes(3, dial_timeout=2.0) as members:
        await _mesh(members)
        ids = [n.peer_id for n in members]
        vectors = [_flat(_tensors(i)) for i in range(3)]
        stalled = 2
        results: dict[int, object] = {}

        async def stall(attempt: int, agreed: list[str]) -> None:
            await trio.sleep_forever()  # agreed to the membership, then went silent

        async def one(i: int) -> None:
            results[i] = await all_reduce(
                members[i],
                "stall",
                ids,
                vectors[i],
                float(100 + i),
                phase_timeout=1.5,
                on_attempt=stall if i == stalled else None,
            )

        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, stalled)
                async with trio.open_nursery() as others:
                    for i in range(2):
                        others.start_soon(one, i)
                nursery.cancel_scope.cancel()
        want = weighted_average(
            [Contribution(ids[i], {"x": vectors[i]}, 100 + i) for i in range(2)]
        )["x"]
        for i in range(2):
            result = results[i]
            assert result.members == tuple(sorted(ids[:2]))  # type: ignore[union-attr]
            assert result.attempts == 2  # type: ignore[union-attr]
            assert torch.equal(result.tensor, want)  # type: ignore[union-attr]


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
