"""A member whose inner steps run under torch.distributed (gloo, two local ranks, DDP).

The member's two ranks are launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
only rank 0 starts a node. It trains three rounds with a worker in this process; the ranks must
end with identical parameters, and the two members must agree on every round's state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import trio
from diloco_helpers import TINY, swarm

from gossamer.training import DiLoCoConfig, DiLoCoWorker
from gossamer.training.outer import state_digest

torch.set_num_threads(1)

pytestmark = pytest.mark.slow  # separate processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_ddp_member_with_two_gloo_ranks(node_config, tmp_path):
    recipe = dataclasses.replace(TINY, shards=3)
    config = DiLoCoConfig(inner_steps=4, rounds=3, min_workers=2, join_timeout=60.0)
    async with swarm(node_config, 1, recipe, config) as [(node, run)]:
        port = _free_port()
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        script = Path(__file__).with_name("ddp_rank.py")
        args = [
            run.run_id,
            node.addrs()[0],
            str(tmp_path / "ddp"),
            json.dumps(dataclasses.asdict(recipe)),
        ]
        outputs: dict[int, str] = {}

        async def rank(r: int) -> None:
            done = await trio.run_process(
                [sys.executable, str(script), *args],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                capture_stdout=True,
                check=True,
            )
            outputs[r] = done.stdout.decode()

        local = DiLoCoWorker(node, run, recipe.inner_loop(0), config)
        result = None

        async def train() -> None:
            nonlocal result
            result = await local.train()

        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rank, 0)
                nursery.start_soon(rank, 1)
                nursery.start_soon(train)
    lines = {r: json.loads(out.strip().splitlines()[-1]) for r, out in outputs.items()}
    assert lines[0]["world"] == lines[1]["world"] == 2
    assert lines[0]["params"] == lines[1]["params"]  # both ranks hold the same parameters
    assert result is not None
    assert lines[0]["digests"] == [r.digest for r in result.records]  # the two members agree
    assert lines[0]["members"] == [2, 2, 2]
    assert lines[0]["final"] == state_digest(result.state.params)
    # the member's tokens are its two ranks' together
    per_rank = config.inner_steps * recipe.batch_size * recipe.context
    assert lines[0]["tokens"] == [2 * per_rank] * 3
    assert [r.tokens for r in result.records] == [per_rank] * 3
