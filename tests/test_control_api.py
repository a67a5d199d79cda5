"""The daemon's local control API: authentication, bounds, errors, loopback-only.

The server runs in-process with a small method table (the node's own methods
are exercised against a real daemon in test_cli_daemon.py); clients are the
real blocking ``ControlClient`` (run in a thread) or raw TCP.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gossamer.node import ControlClient, ControlError, NoDaemon, PeerUnreachable
from gossamer.node.control import (
    MAX_REQUEST_BYTES,
    ControlServer,
    control_file_path,
    write_control_file,
)


def _methods() -> dict[str, Any]:
    async def echo(params: dict[str, Any]) -> Any:
        return params

    async def unreachable(params: dict[str, Any]) -> Any:
        raise PeerUnreachable("nobody home")

    async def crash(params: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    async def not_json(params: dict[str, Any]) -> Any:
        return object()

    async def forever(params: dict[str, Any]) -> Any:
        await trio.sleep_forever()

    return {
        "test.echo": echo,
        "test.unreachable": unreachable,
        "test.crash": crash,
        "test.not_json": not_json,
        "test.forever": forever,
    }


@asynccontextmanager
async def serving(data_dir: Path, **options: Any) -> AsyncIterator[ControlServer]:
    async with trio.open_nursery() as nursery:
        server = ControlServer(_methods(), data_dir, peer_id="test-peer", **options)
        await nursery.start(server.run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def call(data_dir: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    def blocking() -> Any:
        with ControlClient(data_dir, timeout=10) as client:
            return client.call(method, params)

    return await trio.to_thread.run_sync(blocking)


async def raw_exchange(
    port: int, payload: bytes, *, answers: int = 1, wait_close: bool = True
) -> tuple[list[dict], bool]:
    """Send ``payload``; return the answer lines and whether the server then closed.

    With ``wait_close`` it waits (up to 3 s) for the server to close; a server
    drains an oversized request for up to 1 s before it closes.
    """
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(payload)
            buffer = b""
            lines: list[dict] = []
            closed = False
            while True:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    closed = True
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    lines.append(json.loads(line))
                if len(lines) >= answers:
                    if wait_close:
                        with trio.move_on_after(3):
                            closed = await stream.receive_some(1) == b""
                    break
            return lines, closed


def request(token: str, method: str, params: Any = None) -> bytes:
    body: dict[str, Any] = {"token": token, "method": method}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode() + b"\n"


async def test_control_file_call_and_cleanup(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        path = control_file_path(tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        info = json.loads(path.read_text())
        assert info["host"] == "127.0.0.1"
        assert info["port"] == server.port
        assert info["pid"] == os.getpid()
        assert info["peer_id"] == "test-peer"
        assert len(info["token"]) == 64
        assert await call(tmp_path, "test.echo", {"a": [1, 2]}) == {"a": [1, 2]}
    assert not path.exists(), "the control file must go when the server stops"


async def test_wrong_or_missing_token_is_refused_and_closed(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gossamer")
    async with serving(tmp_path) as server:
        for token in ("0" * 64, "", server.token[:-1], "é" * 64):
            lines, closed = await raw_exchange(server.port, request(token, "test.echo", {}))
            assert lines[0]["error"]["type"] == "unauthorized"
            assert closed
        no_token = json.dumps({"method": "test.echo"}).encode() + b"\n"
        lines, closed = await raw_exchange(server.port, no_token)
        assert lines[0]["error"]["type"] == "unauthorized" and closed
        # ... and a wrong token never reaches the handler's answer
        lines, _ = await raw_exchange(server.port, request("x", "test.echo", {"secret": 1}))
        assert "ok" not in lines[0]
    # any local process can knock: one line for all its wrong tokens, not one per knock
    refusals = [r for r in caplog.records if "wrong token" in r.getMessage()]
    assert len(refusals) == 1


async def test_handler_errors_become_answers_and_server_survives(tmp_path: Path) -> None:
    async with serving(tmp_path):
        with pytest.raises(ControlError) as info:
            await call(tmp_path, "test.unreachable")
        assert info.value.type == "PeerUnreachable"
        assert str(info.value) == "nobody home"

        with pytest.raises(ControlError) as info:
            await call(tmp_path, "test.crash")
        assert info.value.type == "internal"
        assert "RuntimeError: boom" in str(info.value)

        with pytest.raises(ControlError) as info:
            await call(tmp_path, "test.not_json")
        assert info.value.type == "internal"

        with pytest.raises(ControlError) as info:
            await call(tmp_path, "no.such")
        assert info.value.type == "unknown_method"
        assert "test.echo" in str(info.value)  # it lists what exists

        assert await call(tmp_path, "test.echo", {"still": "alive"}) == {"still": "alive"}


async def test_malformed_requests(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        lines, closed = await raw_exchange(server.port, b"this is not json\n")
        assert lines[0]["error"]["type"] == "bad_request" and closed
        lines, closed = await raw_exchange(server.port, b"[1, 2, 3]\n")
        assert lines[0]["error"]["type"] == "bad_request" and closed
        # absurd nesting is a bad request, not a crash
        lines, closed = await raw_exchange(server.port, b"[" * 100_000 + b"\n")
        assert lines[0]["error"]["type"] == "bad_request" and closed
        # an authenticated but malformed call keeps the connection usable
        two = request(server.token, "test.echo", [1]) + request(server.token, "test.echo", {"x": 1})
        lines, _ = await raw_exchange(server.port, two, answers=2, wait_close=False)
        assert lines[0]["error"]["type"] == "bad_request"
        assert lines[1] == {"ok": {"x": 1}}


async def test_oversized_request_is_refused(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        payload = b'{"token": "' + b"a" * (MAX_REQUEST_BYTES + 1000)
        lines, closed = await raw_exchange(server.port, payload)
        assert lines[0]["error"]["type"] == "too_large"
        assert closed


async def test_idle_connection_and_slow_handler_are_bounded(tmp_path: Path) -> None:
    async with serving(tmp_path, request_timeout=0.3, handler_timeout=0.3) as server:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                assert await stream.receive_some(100) == b""  # closed for idling
        with pytest.raises(ControlError) as info:
            await call(tmp_path, "test.forever")
        assert info.value.type == "deadline"


def _non_loopback_ipv4() -> str | None:
    """This machine's outward IPv4 address (a UDP connect sends nothing)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_bound_to_loopback_only(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        address = _non_loopback_ipv4()
        if address is None:
            pytest.skip("this machine has no non-loopback IPv4 address")
        with trio.fail_after(5), pytest.raises(OSError):
            await trio.open_tcp_stream(address, server.port)
        assert await call(tmp_path, "test.echo", {}) == {}  # still serving on loopback


async def test_no_daemon_and_stale_control_file(tmp_path: Path) -> None:
    with pytest.raises(NoDaemon, match="no daemon running in"):
        ControlClient(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    dead_pid = int(finished.stdout)
    write_control_file(tmp_path, {"port": 1, "token": "t", "pid": dead_pid, "peer_id": "x"})
    with pytest.raises(NoDaemon, match="stale"):
        ControlClient(tmp_path)
    control_file_path(tmp_path).write_text("{not json")
    with pytest.raises(NoDaemon, match="no daemon running in"):
        ControlClient(tmp_path)
