"""The fuzz campaign on a short budget (the full one is `gossamer fuzz --inputs 100000`), and
the mutation fuzzer it draws from."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import msgpack

from gossamer.bench._mutate import KINDS, Mutator, Protocol
from gossamer.node.wire import frame

CLI = [sys.executable, "-m", "gossamer.cli.main"]


def _framed(obj):
    return frame(msgpack.packb(obj, use_bin_type=True))


PING = {"i": 1, "m": "ping", "p": {"nonce": 7}}
RPC = Protocol("rpc", [_framed(PING)], [PING], _framed)


def test_the_mutator_is_deterministic_and_uses_every_kind() -> None:
    a = [Mutator(random.Random(5)).input(RPC) for _ in range(1)]
    b = [Mutator(random.Random(5)).input(RPC) for _ in range(1)]
    assert a == b
    mutator = Mutator(random.Random(1))
    seen = {mutator.input(RPC)[0] for _ in range(2000)}
    assert seen == set(KINDS)
    raw = Protocol("raw", [b"\x02hi"])  # no msgpack: only byte-level kinds
    assert {Mutator(random.Random(2)).input(raw)[0] for _ in range(500)} <= set(KINDS) - {
        "deep",
        "wide",
        "wrong_type",
        "out_of_range",
    }


def test_structured_inputs_keep_the_framing_and_break_the_content() -> None:
    mutator = Mutator(random.Random(3))
    for _ in range(200):
        kind, data = mutator.input(RPC)
        if kind in ("deep", "wide", "wrong_type", "out_of_range"):
            length = int.from_bytes(data[:4], "big")
            assert length == len(data) - 4, kind  # a well-framed message a decoder must judge


def test_a_short_campaign_finds_no_crash_and_the_target_serves_afterwards() -> None:
    done = subprocess.run(
        [*CLI, "fuzz", "--inputs", "120", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["crashes"] == 0 and not result["target_crashed"]
    assert set(result["protocols"]) == {
        "rpc", "dht", "statesync", "ddm", "crdt", "dataplane", "relay", "dcutr",
    }  # fmt: skip
    for name, stats in result["protocols"].items():
        assert stats["inputs"] == 120, name
        assert stats["served_honest_after"], name
        # the target logs at info; a peer's misbehaviour gets a line a minute, not one per input
        assert stats["target_log_lines"] <= 10, (name, result["target_log"])
    assert 0 < result["rss_peak_mb"] < 2048
