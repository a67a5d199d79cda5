"""The command line: ``gossamer experts list`` and ``gossamer generate`` against a live run
(a PNG a person can open), and one-line errors with non-zero exits for user mistakes."""

from __future__ import annotations

import json

import numpy as np
import torch
import trio
from ddm_net_helpers import CLI, TINY, ddm_node

from gossamer.crdt import CrdtService
from gossamer.training.diffusion import content_id, decode_png, load_digits_split, workflow

torch.set_num_threads(1)


async def gossamer(*args: str, check: bool = True) -> trio.CompletedProcess:
    result = await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"gossamer {args[:2]} failed: {result.stderr.decode()[-2000:]}")
    return result


async def test_generate_writes_a_png_grid_from_a_live_run(tmp_path):
    train, _ = load_digits_split()
    plan = workflow.plan_run(
        train, {"kind": "digits", "n_holdout": 360, "seed": 0}, k=2, total_steps=40, expert=TINY
    )
    blobs = []
    for cluster in range(2):
        torch.manual_seed(cluster)
        model = plan.expert.build(plan.image_shape).eval()
        blobs.append(workflow.checkpoint_bytes(model, plan, cluster, None, 0))
    _, router_blob, _ = workflow.train_run_router(plan, train, steps=20)
    async with ddm_node(tmp_path / "host") as host:
        run = await host.service(CrdtService).host_run(
            "clitest", config={workflow.CONFIG_FIELD: plan.to_doc()}
        )
        await workflow.serve_checkpoints(host, blobs, run=run, router=router_blob)
        boot = host.addrs()[0]

        listed = json.loads(
            (await gossamer("experts", "list", run.run_id, "--bootstrap", boot, "--json")).stdout
        )
        out = tmp_path / "grid.png"
        generated = await gossamer(
            "generate", run.run_id, "--bootstrap", boot, "--n", "12", "--mode", "top2",
            "--steps", "8", "--out", str(out), "--json",
        )  # fmt: skip
    assert listed["k"] == 2 and listed["partition"] == plan.partition
    assert [e["cid"] for e in listed["experts"]] == [content_id(b) for b in blobs]
    assert listed["router"]["cid"] == content_id(router_blob)
    assert all(e["hosts"] == [host.peer_id] for e in listed["experts"])
    summary = json.loads(generated.stdout)
    assert summary["missing_clusters"] == [] and summary["refused_hosts"] == {}
    assert sum(h["rows"] for s in summary["experts"].values() for h in s["hosts"]) > 0
    pixels = decode_png(out.read_bytes())
    # 12 images of 8×8 in 3 columns and 4 rows, 1-pixel padding, each pixel drawn 4×4
    assert pixels.shape == (4 * (4 * 9 + 1), 4 * (3 * 9 + 1))
    assert pixels.dtype == np.uint8 and pixels.std() > 5


async def test_user_mistakes_are_one_line_errors_with_nonzero_exits(tmp_path):
    cases = [
        ("generate", "not-a-run-id"),
        ("generate", "digits-abcdefghijklmnop", "--mode", "top0"),
        ("generate", "digits-abcdefghijklmnop", "--out", str(tmp_path / "grid.jpg")),
        ("experts", "serve", "--checkpoint", str(tmp_path / "missing.safetensors")),
        ("experts", "list"),
    ]
    for args in cases:
        result = await gossamer(*args, check=False)
        err = result.stderr.decode().strip()
        assert result.returncode == 2, (args, result.returncode, err)
        assert err.startswith("gossamer: error:") and "\n" not in err, (args, err)
        assert "Traceback" not in err
