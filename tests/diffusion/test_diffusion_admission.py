"""ddm serving follows the charter of the run its experts belong to."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ddm_net_helpers import ddm_node, tiny_expert, with_cluster

from gossamer.crdt import CrdtService
from gossamer.node.errors import RemoteRefused
from gossamer.training.diffusion import serving, workflow


async def test_a_restricted_runs_experts_are_served_to_its_members_only(tmp_path):
    _, blob = tiny_expert(seed=3)
    blob = with_cluster(blob, 0)
    cid = hashlib.sha256(blob).hexdigest()
    async with (
        ddm_node(tmp_path / "host", dht=False) as host,
        ddm_node(tmp_path / "member", dht=False) as member,
        ddm_node(tmp_path / "outsider", dht=False) as outsider,
    ):
        crdt = host.service(CrdtService)
        run = await crdt.host_run("ddm", access="restricted", allow=[member.peer_id])
        await workflow.serve_checkpoints(host, [blob], run=run)
        for node in (member, outsider):
            await node.connect(host.addrs()[0])
        seen = await serving.describe(member, host.peer_id, timeout=5)
        assert [c["cid"] for c in seen["checkpoints"]] == [cid]
        # an outsider sees nothing and is refused every method with a typed error
        hidden = await serving.describe(outsider, host.peer_id, timeout=5)
        assert hidden["checkpoints"] == []
        with pytest.raises(RemoteRefused, match="not admitted"):
            await serving.fetch_checkpoint(outsider, host.peer_id, cid, len(blob), timeout=5)
        x = torch.zeros(1, 1, 8, 8)
        with pytest.raises(RemoteRefused, match="not admitted"):
            await outsider.call(
                host.peer_id,
                serving.DdmService,
                "denoise",
                {
                    "cid": cid,
                    "shape": list(x.shape),
                    "dtype": "float32",
                    "t": serving.to_wire(torch.zeros(1)),
                    "x": serving.to_wire(x),
                },
                timeout=5,
            )
        assert await serving.fetch_checkpoint(member, host.peer_id, cid, len(blob), timeout=5)
        # revoked mid-run: refused from the next request on
        crdt.revoke(run.run_id, member.peer_id)
        with pytest.raises(RemoteRefused, match="not admitted"):
            await serving.fetch_checkpoint(member, host.peer_id, cid, len(blob), timeout=5)
