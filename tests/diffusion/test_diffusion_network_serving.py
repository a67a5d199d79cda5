"""Experts served over real loopback nodes: exact equality with local experts, the routing math
through the network, validation of every incoming tensor, and refused announcements."""

from __future__ import annotations

import math

import pytest
import torch
from ddm_net_helpers import SHAPE, TINY, ddm_node, tiny_expert, tiny_router
from torch import nn

from gossamer.node.errors import RemoteBadRequest, RemoteRefused, RemoteTooLarge
from gossamer.training.diffusion import (
    ExpertSpec,
    ExpertUnavailable,
    Latency,
    RemoteExpert,
    content_id,
    expert_to_bytes,
    register_expert,
    sample,
    sample_network,
    serving,
)
from gossamer.training.diffusion.announcements import ExpertRecord, RunExperts
from gossamer.training.diffusion.async_sampling import ensemble_velocity_network
from gossamer.training.diffusion.remote_experts import connect_experts
from gossamer.training.diffusion.serving import DdmService, to_wire
from gossamer.training.diffusion.verify import Verifier

torch.set_num_threads(1)


async def _serve_and_connect(server_nodes, client, blobs_by_node, verify="challenge"):
    """Serve ``blobs_by_node[i]`` ({cluster: bytes}) on node i; return verified remote experts."""
    records = {}
    for node, blobs in zip(server_nodes, blobs_by_node, strict=True):
        server = serving.serve(node, max_batch=256)
        for cluster, blob in blobs.items():
            entry = server.add_expert(blob, cluster=cluster)
            rec = records.setdefault(cluster, ExpertRecord(cluster, entry.cid, nbytes=len(blob)))
            rec.hosts.append(node.peer_id)
        await client.connect(node.addrs()[0])
    found = RunExperts("test", records, None, list(records.values()))
    verifier = Verifier(client, mode=verify)
    return await connect_experts(client, found, verifier, use_dht=False), verifier


async def test_remote_experts_give_exactly_what_local_experts_give(tmp_path):
    local, blobs = {}, {}
    for e in range(4):
        local[e], blobs[e] = tiny_expert(seed=e)
    router = tiny_router(4)
    async with (
        ddm_node(tmp_path / "a", dht=False) as a,
        ddm_node(tmp_path / "b", dht=False) as b,
        ddm_node(tmp_path / "c", dht=False) as client,
    ):
        remote, _ = await _serve_and_connect(
            [a, b], client, [{0: blobs[0], 1: blobs[1]}, {2: blobs[2], 3: blobs[3]}]
        )
        assert sorted(remote) == [0, 1, 2, 3]
        # one request, inline and over the data plane, against the module itself
        x, t = torch.randn(40, *SHAPE), torch.rand(40)
        want = local[2](x, t).detach()
        assert torch.equal(await remote[2](x, t), want)
        host = next(iter(remote[2].hosts.values()))
        via_plane = await serving.remote_velocity(
            client, host.peer_id, remote[2].cid, x, t, timeout=10, inline_max_bytes=1024
        )
        assert torch.equal(via_plane, want)
        # whole sampling runs, every mode, against the core sampler with local modules
        for mode, temperature, sticky in [
            ("top1", 0.5, None),
            ("top2", 0.5, None),
            ("full", 0.5, None),
            ("full", 1.0, 0.0),
            ("full", 1.0, 0.4),
        ]:
            ref = sample(router, local, 24, 12, mode, temperature, seed=5, sticky_from=sticky)
            got = await sample_network(
                router, remote, 24, 12, mode, temperature, seed=5, sticky_from=sticky
            )
            assert torch.equal(got, ref), (mode, sticky)
        # sticky with one request per step (no trajectory offload) is the same too
        ref = sample(router, local, 24, 12, "full", 1.0, seed=6, sticky_from=0.0)
        got = await sample_network(
            router, remote, 24, 12, "full", 1.0, seed=6, sticky_from=0.0, offload=False
        )
        assert torch.equal(got, ref)
        served = {e: sum(h.rows for h in r.hosts.values()) for e, r in remote.items()}
        assert all(rows > 0 for rows in served.values())


class ConstantVelocity(nn.Module):
    """Answers the constant ``value`` everywhere: ensemble outputs are weighted means."""

    def __init__(self, image_shape: tuple[int, int, int], value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t) + self.value


register_expert("const-test", ConstantVelocity)


async def test_topk_combination_over_the_network_matches_hand_computation(tmp_path):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    blobs = {}
    for e in range(4):
        spec = ExpertSpec("const-test", {"value": e + 1})
        blobs[e] = expert_to_bytes(spec.build(SHAPE), spec, SHAPE)
    async with (
        ddm_node(tmp_path / "a", dht=False) as a,
        ddm_node(tmp_path / "c", dht=False) as client,
    ):
        remote, _ = await _serve_and_connect([a], client, [blobs])
        x, t = torch.randn(3, *SHAPE), torch.full((3,), 0.5)
        alive = set(remote)
        top2 = await ensemble_velocity_network(lambda *_: probs, remote, x, t, "top2", alive)
        top1 = await ensemble_velocity_network(lambda *_: probs, remote, x, t, "top1", alive)
        full = await ensemble_velocity_network(lambda *_: probs, remote, x, t, "full", alive)
    expected_top2 = [(0.5 * 1 + 0.3 * 2) / 0.8, (0.3 * 3 + 0.4 * 4) / 0.7, 1.5]
    expected_full = [0.5 + 0.6 + 0.45 + 0.2, 0.1 + 0.4 + 0.9 + 1.6, 2.5]
    for row in range(3):
        assert math.isclose(float(top2[row].unique()), expected_top2[row], rel_tol=1e-6)
        assert math.isclose(float(full[row].unique()), expected_full[row], rel_tol=1e-6)
    assert [float(v.unique()) for v in top1] == [1.0, 4.0, 1.0]


async def test_every_malformed_batch_is_refused_and_the_node_keeps_serving(tmp_path):
    _, blob = tiny_expert(seed=1)
    async with (
        ddm_node(tmp_path / "s", dht=False) as s,
        ddm_node(tmp_path / "c", dht=False) as client,
    ):
        server = serving.serve(s, max_batch=16)
        cid = server.add_expert(blob, cluster=0).cid
        await client.connect(s.addrs()[0])
        x, t = torch.randn(4, *SHAPE), torch.rand(4)
        good = {"cid": cid, "shape": [4, *SHAPE], "dtype": "float32", "t": to_wire(t)}

        async def call(method="denoise", **changes):
            params = {**good, "x": to_wire(x), **changes}
            params = {k: v for k, v in params.items() if v is not None}
            # a batch announced on the data plane is awaited for 80% of the caller's deadline
            timeout = 1.0 if "tag" in params else 5.0
            return await client.call(s.peer_id, DdmService, method, params, timeout=timeout)

        nan = x.clone()
        nan[0, 0, 0, 0] = float("nan")
        bad = [
            (RemoteRefused, {"cid": "0" * 64}),  # not served here
            (RemoteRefused, {"dtype": "float16"}),
            (RemoteRefused, {"shape": [4, 1, 8]}),
            (RemoteRefused, {"shape": [4, 3, 8, 8]}),  # not the expert's image shape
            (RemoteTooLarge, {"shape": [17, *SHAPE]}),  # over max_batch
            (RemoteRefused, {"shape": [0, *SHAPE]}),
            (RemoteRefused, {"x": to_wire(x[:3])}),  # byte count does not match the shape
            (RemoteRefused, {"x": to_wire(nan)}),  # not finite
            (RemoteRefused, {"t": to_wire(torch.full((4,), 1.5))}),  # t outside [0, 1]
            (RemoteRefused, {"t": to_wire(torch.rand(3))}),
            (RemoteRefused, {"cond": to_wire(torch.zeros(4, 2))}),  # unconditional expert
            (RemoteBadRequest, {"x": [1.0, 2.0]}),  # a list where raw bytes belong
            (RemoteBadRequest, {"shape": "4x1x8x8"}),
            (RemoteRefused, {"x": None, "tag": "ddm/" + "ab" * 8}),  # nothing on the data plane
        ]
        for error, changes in bad:
            with pytest.raises(error):
                await call(**changes)
        with pytest.raises(RemoteRefused):  # an impossible trajectory
            await call("integrate", t=None, start=5, end=3, steps=10)
        with pytest.raises(RemoteRefused):  # a batch of another shape on the data plane
            await client.dataplane.send(s.peer_id, "ddm/" + "cd" * 8, {"x": torch.zeros(2, 2)})
            await call(x=None, tag="ddm/" + "cd" * 8)
        answer = await call()
        assert isinstance(answer["v"], bytes) and len(answer["v"]) == x.numel() * 4
        assert server.refusals >= len(bad)  # the two bad_request ones die in the rpc layer


async def test_announcements_whose_hash_does_not_match_the_served_weights_are_refused(tmp_path):
    honest, blob = tiny_expert(seed=3)
    other, other_blob = tiny_expert(seed=4)
    cid = content_id(blob)
    async with (
        ddm_node(tmp_path / "liar", dht=False) as liar,
        ddm_node(tmp_path / "swapper", dht=False) as swapper,
        ddm_node(tmp_path / "honest", dht=False) as good,
        ddm_node(tmp_path / "c", dht=False) as client,
    ):
        # 1. holds the announced bytes (fetch and hash pass) but computes with other weights
        serving.serve(liar).add_expert(blob, cluster=0, model=other)
        # 2. announces cid of `blob`, but what it serves under that name is other bytes
        serving.serve(swapper).checkpoints[cid] = serving.ServedCheckpoint(
            cid, other_blob, "expert", other, TINY, SHAPE, cluster=0
        )
        serving.serve(good).add_expert(blob, cluster=0)
        for node in (liar, swapper, good):
            await client.connect(node.addrs()[0])
        # the swapper alone: the bytes it serves under cid do not hash to cid
        alone = ExpertRecord(0, cid, hosts=[swapper.peer_id])
        fresh = Verifier(client)
        assert await connect_experts(client, RunExperts("t", {0: alone}, None, []), fresh) == {}
        assert "hashing to" in fresh.refused[swapper.peer_id]
        # all three: the weights come from whoever has the real bytes; liars are refused
        record = ExpertRecord(0, cid, hosts=[liar.peer_id, swapper.peer_id, good.peer_id])
        verifier = Verifier(client)
        found = RunExperts("test", {0: record}, None, [record])
        remote = await connect_experts(client, found, verifier, use_dht=False)
        states = {p: h.state for p, h in remote[0].hosts.items()}
        assert states == {
            liar.peer_id: "refused",
            swapper.peer_id: "refused",
            good.peer_id: "verified",
        }
        assert "differ" in verifier.refused[liar.peer_id]  # the challenge caught it
        # sampling goes to the honest host only, and matches the honest weights
        x, t = torch.randn(5, *SHAPE), torch.rand(5)
        assert torch.equal(await remote[0](x, t), honest(x, t).detach())
        assert remote[0].hosts[good.peer_id].rows >= 5
        assert remote[0].hosts[liar.peer_id].rows == 0
        # a record naming a cid the host does not serve at all is refused as well
        ghost = ExpertRecord(1, "f" * 64, hosts=[good.peer_id])
        refused = await connect_experts(
            client, RunExperts("test", {1: ghost}, None, [ghost]), verifier, use_dht=False
        )
        assert refused == {}
        assert "does not serve" in verifier.refused[good.peer_id]


async def test_an_expert_without_hosts_raises_expert_unavailable(tmp_path):
    _, blob = tiny_expert(seed=1)
    async with ddm_node(tmp_path / "c", dht=False) as client:
        record = ExpertRecord(0, content_id(blob), hosts=[])
        expert = RemoteExpert(client, record, Verifier(client), use_dht=False)
        with pytest.raises(ExpertUnavailable):
            await expert(torch.randn(2, *SHAPE), torch.rand(2))


async def test_an_expert_of_another_architecture_than_the_runs_is_refused(tmp_path):
    _, blob = tiny_expert(seed=1)  # TINY
    _, other = tiny_expert(seed=2, spec=ExpertSpec("mlp", {"hidden": 48, "depth": 1}))
    async with (
        ddm_node(tmp_path / "s", dht=False) as s,
        ddm_node(tmp_path / "c", dht=False) as client,
    ):
        server = serving.serve(s)
        good, bad = server.add_expert(blob, cluster=0), server.add_expert(other, cluster=1)
        await client.connect(s.addrs()[0])
        records = {
            0: ExpertRecord(0, good.cid, hosts=[s.peer_id]),
            1: ExpertRecord(1, bad.cid, hosts=[s.peer_id]),
        }
        verifier = Verifier(client, expected_spec=TINY)
        remote = await connect_experts(
            client, RunExperts("t", records, None, []), verifier, use_dht=False
        )
        assert sorted(remote) == [0]
        assert "architecture" in verifier.refused[s.peer_id]
        # and a size over the limit is refused before a byte is downloaded
        small = Verifier(client, max_bytes=1000)
        assert (
            await connect_experts(
                client, RunExperts("t", {0: records[0]}, None, []), small, use_dht=False
            )
            == {}
        )
        assert "bytes" in small.refused[s.peer_id] and not small.weights


def test_latency_deadlines_follow_measurements():
    lat = Latency()
    assert lat.deadline(8) == lat.initial
    for _ in range(20):
        lat.observe(0.004, 64)
    assert lat.deadline(64) == lat.floor  # a fast host still gets the floor
    for _ in range(20):
        lat.observe(0.05, 64)
    assert 0.15 <= lat.deadline(64) < 0.5
    assert lat.deadline(640) > lat.deadline(64)  # more rows than measured: more time
    assert lat.deadline(64, scale=4) == pytest.approx(4 * lat.deadline(64))
