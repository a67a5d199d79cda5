"""``gossamer demo`` end to end, shrunk: two worker processes, the tiny model, two rounds."""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio

pytestmark = pytest.mark.slow  # separate processes


async def test_demo_trains_a_swarm_and_compares_with_the_baseline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["GOSSAMER_HOME"] = str(tmp_path / "home")
    argv = [sys.executable, "-m", "gossamer.cli.main", "demo", "--model", "tiny"]
    argv += ["--workers", "2", "--rounds", "2", "--inner-steps", "5", "--json"]
    with trio.fail_after(120):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout)
    assert result["bit_identical"] is True and result["parity_rounds"] == 2
    assert result["workers"] == 2 and result["tokens_per_worker"] == 2 * 5 * 4 * 32
    assert result["diloco"]["eval_loss"] < result["eval_loss_init"]
    assert result["ddp"]["eval_loss"] < result["eval_loss_init"]
    assert 0 < result["diloco"]["bytes_per_worker"] < result["ddp"]["bytes_per_worker"]
    assert result["bytes_reduction"] > 1
