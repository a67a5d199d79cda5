"""A host dies mid-sampling (SIGKILL of a ``gossamer experts serve`` process holding two
experts): the sampler falls back to another host of one expert, found in the DHT only, drops the
other expert whose only host it was, never hangs, and still produces exactly what a local
sampler with the same failure produces."""

from __future__ import annotations

import time

import torch
import trio
from conftest import wait_until
from ddm_net_helpers import (
    ddm_node,
    spawn_server,
    tiny_expert,
    tiny_router,
    wait_ready,
    with_cluster,
)

from gossamer.crdt import CrdtService
from gossamer.dht import DHT
from gossamer.training.diffusion import (
    ExpertUnavailable,
    Verifier,
    connect_experts,
    content_id,
    discover,
    sample,
    sample_network,
    workflow,
)

torch.set_num_threads(1)

STEPS, N, KILL_AFTER = 24, 16, 6


class DiesAfter:
    """A local expert that raises ExpertUnavailable from its ``calls + 1``-th call on."""

    def __init__(self, module: torch.nn.Module, calls: int) -> None:
        self.module, self.calls, self.seen = module, calls, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        if self.seen > self.calls:
            raise ExpertUnavailable("gone")
        return self.module(x, t)


async def test_sampling_survives_a_host_killed_mid_sampling(tmp_path):
    local, blobs = {}, {}
    for e in range(3):
        local[e], blob = tiny_expert(seed=10 + e)
        blobs[e] = with_cluster(blob, e)
    (tmp_path / "e1.safetensors").write_bytes(blobs[1])
    (tmp_path / "e2.safetensors").write_bytes(blobs[2])
    router = tiny_router(3)
    async with (
        ddm_node(tmp_path / "host") as host,
        ddm_node(tmp_path / "replica") as replica,
        ddm_node(tmp_path / "sampler") as me,
    ):
        run = await host.service(CrdtService).host_run("failover")
        boot = host.addrs()[0]
        # the victim, in its own process: experts 1 and 2, announced in the run document
        proc = spawn_server(
            tmp_path / "victim",
            "--checkpoint", str(tmp_path / "e1.safetensors"),
            "--checkpoint", str(tmp_path / "e2.safetensors"),
            "--run", run.run_id, "--bootstrap", boot,
        )  # fmt: skip
        try:
            # expert 0 on the run's host; a replica of expert 1 announced in the DHT only
            await workflow.serve_checkpoints(host, [blobs[0]], run=run)
            await replica.connect(boot)
            await workflow.serve_checkpoints(replica, [blobs[1]])
            (victim,) = await wait_ready([proc])
            await me.connect(boot)
            follower = await workflow.join(me, run.run_id, [boot], member=False)
            await workflow.wait_experts(follower, 3, timeout=20)

            async def replica_provides() -> bool:
                providers = await me.service(DHT).find_providers(content_id(blobs[1]))
                return replica.peer_id in {p.peer_id for p in providers}

            await wait_until(
                replica_provides, 20, interval=0.2, what="the replica's provider record"
            )

            found = await discover(me, run.run_id, run=follower, use_dht=False)
            assert found.experts[1].hosts == [victim.peer_id]  # the document knows one host
            remote = await connect_experts(me, found, Verifier(me))
            assert sorted(remote) == [0, 1, 2]

            async def kill(i: int, x: torch.Tensor) -> None:
                if i == KILL_AFTER:
                    await trio.to_thread.run_sync(victim.kill)

            started = time.perf_counter()
            got = await sample_network(router, remote, N, STEPS, "full", 1.0, seed=7, on_step=kill)
            seconds = time.perf_counter() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # expert 1 moved to the replica the DHT knew of; expert 2 was dropped with its only host
    assert remote[1].hosts[victim.peer_id].state == "down"
    assert remote[1].hosts[replica.peer_id].state == "verified"
    assert remote[1].hosts[replica.peer_id].requests == STEPS - KILL_AFTER - 1
    assert remote[1].fallbacks >= 1
    assert remote[2].hosts[victim.peer_id].state == "down"
    assert seconds < 20, f"sampling took {seconds:.1f} s"
    # the same failure, locally: experts 0 and 1 always answer, expert 2 dies at that step
    reference = sample(
        router,
        {0: local[0], 1: local[1], 2: DiesAfter(local[2], KILL_AFTER + 1)},
        N,
        STEPS,
        "full",
        1.0,
        seed=7,
    )
    assert torch.isfinite(got).all()
    assert torch.equal(got, reference)
