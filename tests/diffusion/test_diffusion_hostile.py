"""A hostile client of an expert host: it cannot keep the host's compute to itself."""

from __future__ import annotations

import pytest
import torch
import trio
from ddm_net_helpers import SHAPE, ddm_node, tiny_expert

from gossamer.node import RemoteError
from gossamer.training.diffusion import serving
from gossamer.training.diffusion.serving import PEER_JOBS, DdmService, to_wire

BURST = 16 * (PEER_JOBS + 40)  # row-steps: a small budget, so that a test-sized job empties it


async def test_one_peer_cannot_take_the_experts_compute(tmp_path, monkeypatch) -> None:
    _, blob = tiny_expert(seed=1)
    async with (
        ddm_node(tmp_path / "host", dht=False) as host,
        ddm_node(tmp_path / "greedy", dht=False) as greedy,
        ddm_node(tmp_path / "honest", dht=False) as honest,
    ):
        monkeypatch.setattr(serving, "PEER_ROW_STEPS_BURST", BURST)
        monkeypatch.setattr(serving, "PEER_ROW_STEPS_PER_S", 1)
        server = serving.serve(host, max_batch=16)
        cid = server.add_expert(blob, cluster=0).cid
        await greedy.connect(host.addrs()[0])
        await honest.connect(host.addrs()[0])
        x = torch.randn(16, *SHAPE)

        def integrate(steps: int) -> dict:
            return {
                "cid": cid, "shape": [16, *SHAPE], "dtype": "float32", "x": to_wire(x),
                "start": 0, "end": steps, "steps": steps,
            }  # fmt: skip

        # a job of the whole burst empties the peer's budget
        big = (BURST - PEER_JOBS * 16) // 16 - 2  # (less what the first round of jobs spent)
        # slow the expert down so that jobs overlap (the host's threads are the resource)
        forward = serving.ExpertServer.integrate

        async def slow_integrate(self, *args, **kwargs):
            await trio.sleep(0.5)
            return await forward(self, *args, **kwargs)

        monkeypatch.setattr(serving.ExpertServer, "integrate", slow_integrate)
        outcomes: list[str] = []

        async def ask(steps: int) -> None:
            try:
                await greedy.call(
                    host.peer_id, DdmService, "integrate", integrate(steps), timeout=60
                )
                outcomes.append("served")
            except RemoteError as exc:
                outcomes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for _ in range(PEER_JOBS + 3):
                nursery.start_soon(ask, 1)
            await trio.sleep(0.2)
            # the honest peer is served while the greedy one is busy
            answer = await honest.call(
                host.peer_id, DdmService, "integrate", integrate(2), timeout=30
            )
            assert len(answer["v"]) == x.numel() * 4
        assert outcomes.count("busy") == 3 and outcomes.count("served") == PEER_JOBS
        monkeypatch.undo()

        # a burst that empties the budget, then refusal until it refills
        await greedy.call(host.peer_id, DdmService, "integrate", integrate(big), timeout=300)
        with pytest.raises(RemoteError) as refused:
            await greedy.call(host.peer_id, DdmService, "integrate", integrate(big), timeout=60)
        assert refused.value.code == "over_budget"
        # the other peer's budget is its own
        await honest.call(host.peer_id, DdmService, "integrate", integrate(4), timeout=30)
