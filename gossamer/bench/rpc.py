"""``gossamer bench rpc``: small-request round trips and connect time, two processes.

The reference is a plain Python TCP ping-pong of the same message size between
two processes, measured in the same run.  ``connect_p50_ms`` is a full libp2p
connection (TCP + Noise XX + Yamux + our peer bookkeeping) to a node we were
not connected to, then disconnected again.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import trio

from gossamer.bench._common import peer_process, percentile, temp_node_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=2000, help="RPC calls to time")
    parser.add_argument("--connects", type=int, default=30, help="connects to time")
    parser.add_argument("--size", type=int, default=32, help="payload bytes per request")


def _raw_round_trips(size: int, count: int) -> list[float]:
    message = os.urandom(size)
    times = []
    with (
        peer_process("raw-echo", "--size", str(size)) as ready,
        socket.create_connection(("127.0.0.1", ready["port"])) as conn,
    ):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(message)
            got = b""
            while len(got) < size:
                got += conn.recv(size - len(got))
            times.append((time.perf_counter() - start) * 1000)
    return times


async def _rpc(size: int, calls: int, connects: int) -> tuple[list[float], list[float]]:
    from gossamer.node import Node

    payload = os.urandom(size)
    call_ms, connect_ms = [], []
    with peer_process("node") as ready:
        async with Node(temp_node_config()) as node:
            peer = await node.connect(ready["addr"])
            for _ in range(50):  # warm-up: open and pool the stream
                await node.call(peer, "bench-echo", "echo", {"data": payload})
            for _ in range(calls):
                start = time.perf_counter()
                await node.call(peer, "bench-echo", "echo", {"data": payload}, timeout=5)
                call_ms.append((time.perf_counter() - start) * 1000)
            for _ in range(connects):
                await node.disconnect(peer)
                with trio.fail_after(5):
                    while node.is_connected(peer):
                        await trio.sleep(0.001)
                start = time.perf_counter()
                await node.connect(ready["addr"])
                connect_ms.append((time.perf_counter() - start) * 1000)
    return call_ms, connect_ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    raw = _raw_round_trips(args.size, args.calls)
    call_ms, connect_ms = trio.run(_rpc, args.size, args.calls, args.connects)
    p50, raw_p50 = percentile(call_ms, 50), percentile(raw, 50)
    return {
        "bench": "rpc",
        "calls": len(call_ms),
        "request_bytes": args.size,
        "p50_ms": round(p50, 3),
        "p99_ms": round(percentile(call_ms, 99), 3),
        "raw_tcp_p50_ms": round(raw_p50, 3),
        "raw_tcp_p99_ms": round(percentile(raw, 99), 3),
        "ratio_p50": round(p50 / raw_p50, 2),
        "connect_p50_ms": round(percentile(connect_ms, 50), 2),
        "connect_p99_ms": round(percentile(connect_ms, 99), 2),
        "goal_p50_ms": 1.0,
        "goal_connect_p50_ms": 30.0,
    }
