"""Churn across processes: a worker SIGKILLed inside the all-reduce; it restarts and rejoins.

In every overlap mode: blocking rounds stop for the all-reduce, streaming and eager ones run it
beside the inner steps (the child stalls inside its first exchange of the round).

Two workers run in this process; the third is a child process
(``python -m gossamer.training.worker``). The child announces (``stalling``) that it agreed on
the membership of round 3's all-reduce and then goes quiet; we SIGKILL it right there. The round
must complete without it and the run go on; the child restarts from the same data directory
(same identity, its run document and a checkpoint that is now stale), rejoins, downloads the
state, and must hold bit-identical parameters after its first round back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch
import trio
from conftest import wait_until
from diloco_helpers import TINY, SlowInner, swarm

from gossamer.training import DiLoCoConfig, DiLoCoWorker

torch.set_num_threads(1)

STALL_ROUND = 3

pytestmark = pytest.mark.slow  # separate processes


class Child:
    """A worker process and its JSON-line events."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._changed = trio.Event()

    async def read(self) -> None:
        while True:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                self._changed.set()
                return
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, _, rest = bytes(self._buffer).partition(b"\n")
                self._buffer = bytearray(rest)
                if line.startswith(b"{"):
                    self.events.append(json.loads(line))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for event in self.events:
                    if event["event"] == "error":
                        raise AssertionError(f"worker failed: {event['message']}")
                    if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                        return event
                if self.process.returncode is not None:
                    raise AssertionError(f"worker exited ({self.process.returncode}) before {kind}")
                await self._changed.wait()


async def start_child(nursery, data_dir, run_id: str, bootstrap: str, *extra: str) -> Child:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "gossamer.training.worker",
            "--data-dir",
            str(data_dir),
            "--join",
            run_id,
            "--bootstrap",
            bootstrap,
            "--shard",
            "2",
            "--no-dht",
            "--exit-with-stdin",
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    child = Child(process)
    nursery.start_soon(child.read)
    return child


@pytest.mark.parametrize(
    "overlap",
    [
        "none",
        pytest.param(
            "streaming",
            marks=pytest.mark.xfail(
                reason=(
                    "known bug, about 1 run in 3 (was 2 in 3 before silent members stopped "
                    "blocking a commit): in the round the member dies, a later fragment's "
                    "exchange can start with one survivor still counting it and the other not; "
                    "each ends that join alone and re-enters, and their records then differ"
                ),
                strict=False,
            ),
        ),
        "eager",
    ],
)
async def test_worker_killed_mid_collective_rejoins_bit_identical(node_config, tmp_path, overlap):
    recipe = dataclasses.replace(TINY, shards=3, schedule_steps=400)
    # overlapped rounds run several exchanges per round: each one that still counts the dead
    # child waits out its join deadline, so keep it short
    config = DiLoCoConfig(
        inner_steps=5,
        min_workers=3,
        join_timeout=60.0 if overlap == "none" else 15.0,
        overlap=overlap,
    )
    victim_dir = tmp_path / "victim"
    # Both stop after the same round: a flag read between rounds let one of
    # them start (and finish alone) one round more than the other. The round of the state a
    # member last published is the same on both at that check, in every mode.
    stop_after: list[int] = []
    async with swarm(node_config, 2, recipe, config) as members:
        run_id = members[0][1].run_id
        bootstrap = members[0][0].addrs()[0]
        workers = [
            DiLoCoWorker(
                node,
                run,
                SlowInner(recipe.inner_loop(i), 0.02),
                config,
                should_stop=lambda i=i: (
                    bool(stop_after) and (workers[i].state_round or 0) >= stop_after[0]
                ),
            )
            for i, (node, run) in enumerate(members)
        ]
        results: dict[int, Any] = {}

        async def train(i: int) -> None:
            results[i] = await workers[i].train()

        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(train, i)
                first = await start_child(
                    nursery, victim_dir, run_id, bootstrap, "--stall-round", str(STALL_ROUND)
                )
                stalling = await first.wait_for("stalling", 60, round=STALL_ROUND)
                assert len(stalling["members"]) == 3  # it was part of the agreed membership
                first.process.send_signal(signal.SIGKILL)
                await first.process.wait()

                # the round completes without it, and the run goes on
                await wait_until(
                    lambda: len(workers[0].records) >= STALL_ROUND + 3,
                    timeout=100,
                    what="two more rounds after the stalled one",
                )
                stalled = next(r for r in workers[0].records if r.round == STALL_ROUND)
                assert len(stalled.members) == 2 and stalled.attempts >= 2

                second = await start_child(nursery, victim_dir, run_id, bootstrap)
                back = await second.wait_for("round", 60)
                await second.wait_for("round", 30, round=back["round"] + 1)
                second.process.send_signal(signal.SIGKILL)
                await second.process.wait()
                stop_after.append(max(w.state_round or 0 for w in workers) + 1)
    states = [e for e in second.events if e["event"] == "state"]
    assert states and states[0]["source"] == "download"  # its checkpoint was stale
    by_round = {r.round: r.digest for r in results[0].records}
    assert by_round == {r.round: r.digest for r in results[1].records}
    rounds_back = [e for e in second.events if e["event"] == "round"]
    assert rounds_back[0]["digest"] == by_round[rounds_back[0]["round"]]  # identical at once
    assert rounds_back[0]["parity_ok"] and rounds_back[0]["members"] == 3
    assert rounds_back[1]["digest"] == by_round[rounds_back[1]["round"]]
    assert all(r.parity_ok for r in results[0].records)
