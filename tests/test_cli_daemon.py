"""``gossamer node start`` and the commands that talk to it, as real processes.

Every process gets a timeout and is killed in ``finally``; readiness is the
control file appearing (polled), never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import wait_until

CLI = [sys.executable, "-m", "gossamer.cli.main"]
LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--dataplane-listen", "127.0.0.1:0"]
READY_TIMEOUT_S = 30.0  # interpreter + libp2p import on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without GOSSAMER_* settings that would leak into the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["GOSSAMER_HOME"] = str(tmp_path / "default-home")
    return env


async def gossamer(
    *args: str | Path, env: dict[str, str], timeout: float = 30.0
) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*CLI, *map(str, args)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


async def gossamer_json(*args: str | Path, env: dict[str, str]) -> object:
    done = await gossamer(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@dataclass
class Daemon:
    process: trio.Process
    data_dir: Path
    stdout: Path
    stderr: Path
    info: dict

    @property
    def control_file(self) -> Path:
        return self.data_dir / "control.json"

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(STOP_TIMEOUT_S):
            return await self.process.wait()


async def _wait_ready(process: trio.Process, data_dir: Path, stderr: Path) -> dict:
    control = data_dir / "control.json"

    def control_file() -> dict | None:
        if process.poll() is not None:
            pytest.fail(f"daemon exited ({process.returncode}): {stderr.read_text()}")
        try:
            return json.loads(control.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or half written
            return None

    return await wait_until(control_file, READY_TIMEOUT_S, what=f"the control file {control}")


@asynccontextmanager
async def daemon(
    tmp_path: Path, name: str, env: dict[str, str], *extra: str
) -> AsyncIterator[Daemon]:
    data_dir = tmp_path / name
    stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [*CLI, "node", "start", "--data-dir", str(data_dir), *LOOPBACK, *extra],
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        info = await _wait_ready(process, data_dir, stderr)
        yield Daemon(process, data_dir, stdout, stderr, info)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def _libraries_mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_daemon_lifecycle(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    async with daemon(tmp_path, "a", env) as a:
        # control file: private, and it names this daemon
        assert stat.S_IMODE(a.control_file.stat().st_mode) == 0o600
        assert a.info["pid"] == a.process.pid
        assert a.info["host"] == "127.0.0.1"

        status = await gossamer_json("node", "status", "--data-dir", a.data_dir, env=env)
        assert status["peer_id"] == a.info["peer_id"]
        assert status["addrs"] and all(
            addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{status['peer_id']}")
            for addr in status["addrs"]
        )
        assert status["peers_connected"] == 0
        assert {"uptime_s", "protocols", "dataplane", "peers_known"} <= status.keys()
        assert await gossamer_json("peers", "--data-dir", a.data_dir, env=env) == []
        ident = await gossamer_json("node", "id", "--data-dir", a.data_dir, env=env)
        assert ident["running"] and ident["addrs"] == status["addrs"]
        assert f"ready: {status['peer_id']}" in a.stdout.read_text()
        if Path(f"/proc/{a.process.pid}/maps").exists():
            assert "libtorch" not in _libraries_mapped(a.process.pid)

        async with daemon(tmp_path, "b", env, "--bootstrap", status["addrs"][0]) as b:
            b_id = b.info["peer_id"]

            async def peers_with_b() -> list | None:
                peers = await gossamer_json("peers", "--data-dir", a.data_dir, env=env)
                assert isinstance(peers, list)
                return (
                    peers if any(p["peer_id"] == b_id and p["connected"] for p in peers) else None
                )

            peers = await wait_until(peers_with_b, 20, interval=0.1, what="a connected to b")
            (entry,) = peers
            assert entry["direction"] == "inbound"
            ping = await gossamer_json("node", "ping", b_id, "--data-dir", a.data_dir, env=env)
            assert ping["rtt_ms"] > 0

            assert await b.stop(signal.SIGINT) == 0
            assert not b.control_file.exists()

        assert await a.stop(signal.SIGTERM) == 0
        assert not a.control_file.exists()
        for log in (a.stderr, b.stderr):
            text = log.read_text()
            assert "Traceback" not in text, text
            assert "stopped" in text


async def test_second_daemon_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    async with daemon(tmp_path, "a", env) as a:
        done = await gossamer("node", "start", "--data-dir", a.data_dir, *LOOPBACK, env=env)
        assert done.returncode == 1
        assert done.stderr.decode().strip() == (
            f"gossamer: error: another daemon is already running in {a.data_dir}"
        )
        assert a.control_file.exists(), "the refused second daemon must not touch the first"
        assert await a.stop(signal.SIGTERM) == 0


async def test_ports_in_use_fail_in_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "libp2p": ["--listen", f"/ip4/127.0.0.1/tcp/{port}"],
            "control": [*LOOPBACK, "--control-port", str(port)],
        }
        results = {}

        async def run(name: str, args: list[str]) -> None:
            results[name] = await gossamer(
                "node", "start", "--data-dir", tmp_path / name, *args, env=env
            )

        async with trio.open_nursery() as nursery:
            for name, args in cases.items():
                nursery.start_soon(run, name, args)
    for name, expected in (("libp2p", "could not listen on"), ("control", "control API")):
        done = results[name]
        last = done.stderr.decode().strip().splitlines()[-1]
        assert done.returncode == 1, (name, done.stderr.decode())
        assert last.startswith("gossamer: error: ") and expected in last, (name, last)
        assert "Traceback" not in done.stderr.decode()
        assert not (tmp_path / name / "control.json").exists()


async def test_client_commands_without_daemon(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    empty = tmp_path / "empty"
    results = {}

    async def run(name: str, *args: str | Path) -> None:
        results[name] = await gossamer(*args, env=env)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "status", "node", "status", "--data-dir", empty)
        nursery.start_soon(run, "peers", "peers", "--data-dir", empty, "--json")
        nursery.start_soon(run, "ping", "node", "ping", "12D3KooWabc", "--data-dir", empty)
    for name, done in results.items():
        assert done.returncode == 1, name
        lines = done.stderr.decode().strip().splitlines()
        assert lines == [f"gossamer: error: no daemon running in {empty}"], (name, lines)
        assert done.stdout == b""


async def test_cli_mistakes_are_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("listen = [\n")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text('lisen = ["/ip4/127.0.0.1/tcp/0"]\n')
    data = str(tmp_path / "d")
    cases = {
        "unknown flag": (["node", "start", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
        "bad listen multiaddr": (["node", "start", "--data-dir", data, "--listen", "nonsense"],
                                 "listen address 'nonsense' is not a multiaddr"),
        "bootstrap without peer id": (
            ["node", "start", "--data-dir", data, "--bootstrap", "/ip4/127.0.0.1/tcp/1"],
            "must end in /p2p/<peer id>"),
        "missing config": (["node", "start", "--config", str(tmp_path / "nope.toml")],
                           "does not exist"),
        "malformed toml": (["node", "start", "--config", str(bad_toml)], "is not valid TOML"),
        "unknown toml key": (["node", "status", "--config", str(unknown_key)],
                             "unknown config key 'lisen'"),
        "bad connect addr": (["node", "connect", "garbage", "--data-dir", data],
                             "is not a multiaddr"),
        "bad peer id": (["node", "ping", "0OIl", "--data-dir", data], "is not a peer id"),
        "bad control port": (["node", "start", "--control-port", "x"], "invalid int value"),
        "unknown bench": (["bench", "no-such-bench"], "unknown bench 'no-such-bench'"),
        "missing subcommand": (["node"], "required"),
    }  # fmt: skip
    results = {}

    async def run(name: str, args: list[str]) -> None:
        results[name] = await gossamer(*args, env=env)

    async with trio.open_nursery() as nursery:
        for name, (args, _) in cases.items():
            nursery.start_soon(run, name, args)
    for name, (_, expected) in cases.items():
        done = results[name]
        stderr = done.stderr.decode()
        assert done.returncode == 2, (name, done.returncode, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("gossamer: error: "), (name, stderr)
        assert expected in stderr, (name, stderr)
        assert "Traceback" not in stderr
    assert not (tmp_path / "d").exists(), "a rejected start must not create the data dir"


async def test_version_and_help(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    version = await gossamer("--version", env=env)
    assert version.returncode == 0
    assert version.stdout.decode().startswith("gossamer ")
    helped = await gossamer("node", "start", "--help", env=env)
    assert helped.returncode == 0 and b"--bootstrap" in helped.stdout


async def test_node_id_is_persistent_without_daemon(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    data = tmp_path / "fresh"
    first = await gossamer_json("node", "id", "--data-dir", data, env=env)
    second = await gossamer_json("node", "id", "--data-dir", data, env=env)
    assert first["peer_id"] == second["peer_id"]
    assert first["peer_id"].startswith("12D3KooW")
    assert not first["running"]
    assert first["addrs"] == [f"/ip4/0.0.0.0/tcp/0/p2p/{first['peer_id']}"]
    assert stat.S_IMODE((data / "identity.key").stat().st_mode) == 0o600
    plain = await gossamer("node", "id", "--data-dir", data, env=env)
    assert plain.stdout.decode().splitlines()[0] == first["peer_id"]


def test_daemon_modules_do_not_import_torch() -> None:
    code = (
        "import sys, gossamer.node.daemon, gossamer.node.control, gossamer.cli.main\n"
        "from gossamer.cli.main import build_parser\n"
        "build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
