"""``gossamer run host --config run.toml`` and ``gossamer run join RUN_ID --bootstrap ADDR``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio
from conftest import wait_until

RUN_TOML = """
name = "cli_test"

[model]
n_layer = 1
n_head = 2
d_model = 32
context = 32

[data]
batch_size = 4
shards = 2

[diloco]
inner_steps = 4
rounds = 3
codec = "int4"
min_workers = 2
"""

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--dataplane-listen", "127.0.0.1:0", "--no-dht"]

pytestmark = pytest.mark.slow  # separate processes


async def _lines(process, out: list[dict]) -> None:
    buffer = b""
    while True:
        chunk = await process.stdout.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.startswith(b"{"):
                out.append(json.loads(line))


def _first(events: list[dict], kind: str) -> dict | None:
    """The first ``kind`` event a process has printed so far."""
    return next((event for event in events if event.get("event") == kind), None)


async def test_run_host_and_join(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env |= {"GOSSAMER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "gossamer.cli.main", "run"]
    host_cmd = [*cli, "host", "--config", str(run_file), "--data-dir", str(tmp_path / "h")]
    host_events: list[dict] = []
    join_events: list[dict] = []
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            host = await trio.lowlevel.open_process(
                [*host_cmd, *LOOPBACK, "--shard", "0", "--json"], stdout=subprocess.PIPE, env=env
            )
            nursery.start_soon(_lines, host, host_events)
            ready = await wait_until(
                lambda: _first(host_events, "ready"), 60, what="the host's ready event"
            )
            join_cmd = [*cli, "join", ready["run_id"], "--bootstrap", ready["addrs"][0]]
            joiner = await trio.lowlevel.open_process(
                [*join_cmd, "--data-dir", str(tmp_path / "j"), *LOOPBACK, "--json"],
                stdout=subprocess.PIPE,
                env=env,
            )
            nursery.start_soon(_lines, joiner, join_events)
            assert await host.wait() == 0
            assert await joiner.wait() == 0
    host_result = await wait_until(
        lambda: _first(host_events, "result"), 1, what="the host's result"
    )
    join_result = await wait_until(
        lambda: _first(join_events, "result"), 1, what="the joiner's result"
    )
    assert host_result["final_round"] == join_result["final_round"] == 3
    assert host_result["digests"] == join_result["digests"]
    assert host_result["parity_ok"] == host_result["parity_compared"] == 3
    assert host_result["eval_loss"] == join_result["eval_loss"] < 5.5
    rounds = [e for e in host_events if e.get("event") == "round"]
    assert [e["members"] for e in rounds] == [2, 2, 2]


async def test_run_host_refuses_a_bad_run_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[diloco]\ninner_steps = 0\n')
    done = await trio.run_process(
        [sys.executable, "-m", "gossamer.cli.main", "run", "host", "--config", str(bad)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2
    assert b"inner_steps" in done.stderr and b"Traceback" not in done.stderr


async def test_admission_mistakes_are_one_line(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_TOML)

    async def cli(*argv: str):
        return await trio.run_process(
            [sys.executable, "-m", "gossamer.cli.main", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    for argv, words in (
        (("run", "host", "--config", str(run_file), "--allow", "nobody"), b"not a peer id"),
        (("run", "join", "demo-aaaaaaaaaaaaaaaa", "--invite", "gsi1.!!"), b"--invite"),
        (("run", "join", "demo-aaaaaaaaaaaaaaaa", "--invite", "hello"), b"gsi1."),
    ):
        done = await cli(*argv, "--data-dir", str(tmp_path / "w"))
        assert done.returncode != 0, argv
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and words in done.stderr and b"Traceback" not in done.stderr
