"""The collective's deadlines come from the links the data plane measured."""

import torch
import trio

from gossamer.node import DeadlinePolicy, LinkShape

torch.set_num_threads(1)


async def test_the_collective_deadline_follows_the_measured_links(node_config):
    """Through a 40 Mbit/s link, a phase's deadline is what the measured link needs (not a
    constant, not the old 20 MB/s assumption), and the all-reduce commits."""
    from conftest import running_nodes

    from gossamer.training.collective import AllReduce

    shape = LinkShape(up_mbit=40, latency_ms=10)
    async with running_nodes([node_config(shape=shape) for _ in range(3)]) as nodes:
        for x in nodes:
            for y in nodes:
                if x is not y:
                    await x.connect(y.addrs()[0])
        members = [n.peer_id for n in nodes]
        numel = 1_000_000  # 4 MB fp32: 2.7 MB per peer per phase with verified parts
        policy = DeadlinePolicy(floor=1.0, ceiling=120.0, safety=3.0)
        results = {}
        timeouts = {}

        async def one(i: int, node) -> None:
            collective = AllReduce(node, "measured", members, deadlines=policy)
            flat = torch.full((numel,), float(i))
            results[i] = await collective.run(flat, 1.0)
            timeouts[i] = collective._timeout(flat, sorted(members))

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(nodes):
                nursery.start_soon(one, i, node)
        for i in range(3):
            assert torch.allclose(results[i].tensor, torch.full((numel,), 1.0))
            # 2 × 4 MB / 3 per peer at ≤ 40 Mbit/s shared by two sends: ≥ 0.5 s expected
            assert policy.floor < timeouts[i] < policy.ceiling
