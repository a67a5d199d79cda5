"""Configuration as the CLI applies it: defaults < TOML < GOSSAMER_* env < flags.

``gossamer node config --json`` prints the config that ``gossamer node start``
would run with (both build it with ``gossamer.cli.common.load_node_config``),
so these tests run the real command line without starting a node.
(``load_config`` itself is tested in tests/node/test_node_identity_config.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

CLI = [sys.executable, "-m", "gossamer.cli.main"]


def env_with(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["GOSSAMER_HOME"] = str(tmp_path / "home")
    env.update(settings)
    return env


async def gossamer(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    with trio.fail_after(30):
        return await trio.run_process(
            [*CLI, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False, env=env
        )


async def test_precedence_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'data_dir = "{}"\n'
        "control_port = 1111\n"
        "dial_timeout = 3.0\n"
        'listen = ["/ip4/127.0.0.1/tcp/4001"]\n'
        "[node]\n"
        "ping_interval = 7.5\n"
        "[run]\n"  # tables of other layers are theirs, not unknown keys
        'name = "ignored here"\n'.format(tmp_path / "from-toml")
    )
    env = env_with(tmp_path, GOSSAMER_CONTROL_PORT="2222", GOSSAMER_DIAL_TIMEOUT="4.5")
    results: dict[str, subprocess.CompletedProcess] = {}

    async def run(name: str, env: dict[str, str], *args: str | Path) -> None:
        results[name] = await gossamer("node", "config", "--json", *args, env=env)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "defaults", env_with(tmp_path), "--data-dir", tmp_path / "x")
        nursery.start_soon(run, "toml", env_with(tmp_path), "--config", toml)
        nursery.start_soon(run, "toml+env", env, "--config", toml)
        nursery.start_soon(
            run,
            "toml+env+flags",
            env,
            "--config",
            toml,
            "--control-port",
            "3333",
            "--data-dir",
            tmp_path / "from-flag",
            "--listen",
            "/ip4/127.0.0.1/tcp/5001",
            "--listen",
            "/ip4/127.0.0.1/tcp/5002",
        )
    for name, done in results.items():
        assert done.returncode == 0, (name, done.stderr.decode())
    config = {name: json.loads(done.stdout) for name, done in results.items()}

    assert config["defaults"]["control_port"] == 0
    assert config["defaults"]["listen"] == ["/ip4/0.0.0.0/tcp/0"]

    assert config["toml"]["control_port"] == 1111
    assert config["toml"]["dial_timeout"] == 3.0
    assert config["toml"]["ping_interval"] == 7.5
    assert config["toml"]["data_dir"] == str(tmp_path / "from-toml")

    assert config["toml+env"]["control_port"] == 2222
    assert config["toml+env"]["dial_timeout"] == 4.5
    assert config["toml+env"]["listen"] == ["/ip4/127.0.0.1/tcp/4001"]

    flags = config["toml+env+flags"]
    assert flags["control_port"] == 3333
    assert flags["dial_timeout"] == 4.5  # no flag: env still wins over TOML
    assert flags["data_dir"] == str(tmp_path / "from-flag")
    # repeated flags replace the TOML list, they do not add to it
    assert flags["listen"] == ["/ip4/127.0.0.1/tcp/5001", "/ip4/127.0.0.1/tcp/5002"]


async def test_bad_config_is_refused_in_one_line(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[node]\nmax_conections = 5\n")
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('control_port = "eighty"\n')
    cases = {
        "unknown key": (["--config", unknown], {}, "unknown config key 'max_conections'"),
        "wrong type": (["--config", wrong_type], {}, "'control_port' expects an integer"),
        "bad env": ([], {"GOSSAMER_DIAL_TIMEOUT": "soon"}, "'dial_timeout' expects a number"),
        "bad flag value": (["--dataplane-listen", "nowhere"], {}, "must look like HOST:PORT"),
    }
    results: dict[str, subprocess.CompletedProcess] = {}

    async def run(name: str, args: list, settings: dict[str, str]) -> None:
        results[name] = await gossamer("node", "config", *args, env=env_with(tmp_path, **settings))

    async with trio.open_nursery() as nursery:
        for name, (args, settings, _) in cases.items():
            nursery.start_soon(run, name, args, settings)
    for name, (_, _, expected) in cases.items():
        done = results[name]
        stderr = done.stderr.decode()
        assert done.returncode == 2, (name, stderr)
        assert stderr.count("\n") == 1 and expected in stderr, (name, stderr)
        assert done.stdout == b""
