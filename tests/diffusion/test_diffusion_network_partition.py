"""The run's plan over the network: every node derives the same partition from the published
recipe (another process included), and the router a node fetches by content id routes well
above chance on held-out noised images."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch
import trio
from ddm_net_helpers import ddm_node

from gossamer.crdt import CrdtService
from gossamer.training.diffusion import (
    ROUTER_SLOT,
    Verifier,
    discover,
    fetch_router,
    load_digits_split,
    router_accuracy,
    router_to_bytes,
    workflow,
)

torch.set_num_threads(1)

DIGITS = {"kind": "digits", "n_holdout": 360, "seed": 0}

# A second process: fetch the plan from the run document, load its own copy of the data, and
# report what it derived. It closes its node before touching the data, as a trainer does.
CHILD = """
import hashlib, json, sys, tempfile, trio
from pathlib import Path
from gossamer.node.config import NodeConfig
from gossamer.training.diffusion import workflow
run_id, addr = sys.argv[1], sys.argv[2]
config = NodeConfig(data_dir=Path(tempfile.mkdtemp()), listen=["/ip4/127.0.0.1/tcp/0"],
                    dataplane_listen="127.0.0.1:0", mdns=False)
plan = trio.run(workflow.fetch_plan, config, run_id, [addr])
data = workflow.load_data(plan.data)
workflow.check_data(plan, data)
assign = plan.recipe.assign(data.images)
print(json.dumps({"partition": plan.partition,
                  "assignment": hashlib.sha256(assign.tobytes()).hexdigest(),
                  "sizes": [int((assign == c).sum()) for c in range(plan.k)]}))
"""


def _digest(assign: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(assign, dtype=np.int64).tobytes()).hexdigest()


async def test_every_node_derives_the_same_partition_from_the_published_recipe(tmp_path):
    train, _ = load_digits_split()
    plan = workflow.plan_run(train, DIGITS, k=4, total_steps=100)
    host_assign = plan.recipe.assign(train.images)
    async with (
        ddm_node(tmp_path / "host", dht=False) as host,
        ddm_node(tmp_path / "b", dht=False) as b,
    ):
        crdt = host.service(CrdtService)
        run = await crdt.host_run("ddmtest", config={workflow.CONFIG_FIELD: plan.to_doc()})
        # a second node in this process …
        follower = await workflow.join(b, run.run_id, host.addrs(), member=False)
        got = await workflow.wait_plan(follower, timeout=10)
        data = workflow.load_data(got.data)
        workflow.check_data(got, data)
        assert got.partition == plan.partition
        assert got.expert_steps == plan.expert_steps
        assert np.array_equal(got.recipe.assign(data.images), host_assign)
        for cluster in range(plan.k):
            assert torch.equal(
                workflow.cluster_images(got, data, cluster),
                workflow.cluster_images(plan, train, cluster),
            )
        # … and one in its own process
        result = await trio.run_process(
            [sys.executable, "-c", CHILD, run.run_id, host.addrs()[0]],
            capture_stdout=True,
            capture_stderr=True,
        )
    child = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert child["partition"] == plan.partition
    assert child["assignment"] == _digest(host_assign)
    assert child["sizes"] == [int((host_assign == c).sum()) for c in range(plan.k)]


async def test_a_plan_for_other_data_is_refused(tmp_path):
    train, _ = load_digits_split()
    plan = workflow.plan_run(train, DIGITS, k=4, total_steps=100)
    other = load_digits_split(seed=1)[0]  # another split: other images
    try:
        workflow.check_data(plan, other)
    except workflow.PlanError as exc:
        assert "digest" in str(exc)
    else:
        raise AssertionError("a node with other data must not train on this plan")
    doc = plan.to_doc()
    doc["partition"] = "0" * 64
    try:
        workflow.RunPlan.from_doc(doc)
    except workflow.PlanError as exc:
        assert "digest" in str(exc)
    else:
        raise AssertionError("a recipe that does not match its digest must be refused")


async def test_the_router_fetched_over_the_network_routes_above_chance(tmp_path):
    train, held = load_digits_split()
    plan = workflow.plan_run(train, DIGITS, k=4, total_steps=100)
    _, blob, _ = workflow.train_run_router(plan, train, steps=150)
    async with (
        ddm_node(tmp_path / "host", dht=False) as host,
        ddm_node(tmp_path / "b", dht=False) as b,
    ):
        run = await host.service(CrdtService).host_run(
            "ddmtest", config={workflow.CONFIG_FIELD: plan.to_doc()}
        )
        await workflow.serve_checkpoints(host, [], run=run, router=blob)
        follower = await workflow.join(b, run.run_id, host.addrs(), member=False)
        await follower.wait_for(lambda doc: ROUTER_SLOT in doc.experts(), 10)
        found = await discover(b, run.run_id, run=follower, use_dht=False)
        assert found.router is not None and found.router.hosts == [host.peer_id]
        fetched = await fetch_router(b, found.router, Verifier(b))
    assert router_to_bytes(fetched) == blob
    held_assign = plan.recipe.assign(held.images)
    chance = float(np.bincount(held_assign, minlength=plan.k).max() / len(held_assign))
    acc = router_accuracy(fetched, held.images, held_assign, seed=1)
    assert acc[1.0] > 0.85 and acc[0.6] > 0.7, acc
    assert np.mean(list(acc.values())) > chance + 0.25, (acc, chance)
    assert acc[0.4] > chance


def test_a_trained_expert_checkpoint_names_its_cluster_run_and_partition():
    from gossamer.training.diffusion import checkpoint_meta, expert_from_bytes
    from gossamer.training.diffusion.serving import ExpertServer

    train, _ = load_digits_split()
    plan = workflow.plan_run(train, DIGITS, k=4, total_steps=100)
    model, blob = workflow.train_cluster_expert(plan, train, 2, run_id="r-x", steps=3)
    meta = checkpoint_meta(blob)
    assert meta == {"cluster": 2, "run": "r-x", "partition": plan.partition, "steps": 3}
    rebuilt, spec, shape = expert_from_bytes(blob)
    assert spec == plan.expert and shape == plan.image_shape
    x, t = torch.randn(3, *shape), torch.rand(3)
    assert torch.equal(rebuilt(x, t), model(x, t))
    entry = ExpertServer().add_expert(blob)
    assert (entry.cluster, entry.run_id) == (2, "r-x")
