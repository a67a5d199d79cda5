"""The daemon's ``[dht]`` table: read from the config file, checked key by key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gossamer.dht import DHTConfig
from gossamer.node import ConfigError, load_config


def test_dht_table_reaches_the_dht_config(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        "[node]\nmdns = false\n"
        "[dht]\nreplicas = 5\nrepublish_interval = 120\npersist = false\n"
        "[dht.limits]\nmax_entries_per_peer = 50\n"
    )
    config = load_config(path, env={})
    dht = DHTConfig.from_table(config.tables["dht"])
    assert (dht.replicas, dht.republish_interval, dht.persist) == (5, 120.0, False)
    assert isinstance(dht.republish_interval, float)
    assert dht.limits.max_entries_per_peer == 50
    assert dht.limits.max_bytes_per_peer == DHTConfig().limits.max_bytes_per_peer
    assert DHTConfig.from_table({}) == DHTConfig()


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"replica": 5}, "unknown config key 'replica' in [dht]"),
        ({"replicas": "5"}, "'replicas' expects an integer, got '5' (in [dht])"),
        ({"persist": 1}, "'persist' expects true/false, got 1 (in [dht])"),
        ({"op_timeout": -1}, "'op_timeout' must not be negative (in [dht])"),
        ({"replicas": 30, "k": 20}, "replicas <= k"),
        ({"limits": 3}, "'limits' must be a table"),
        (
            {"limits": {"max_entries": True}},
            "'max_entries' expects an integer, got True (in [dht].limits)",
        ),
    ],
)
def test_bad_dht_tables_are_refused_by_name(table: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        DHTConfig.from_table(table)
    assert says in str(info.value)


def test_node_start_refuses_a_bad_dht_table_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[dht]\nreplicass = 3\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gossamer.cli.main",
            "node",
            "start",
            "--config",
            str(path),
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown config key 'replicass'" in proc.stderr
    assert "Traceback" not in proc.stderr
