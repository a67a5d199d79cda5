"""The far end of the two-process benchmarks: ``python -m gossamer.bench._peer ROLE``.

Roles:
* ``raw-sink``: a plain TCP socket that swallows N bytes per round and answers one byte.
* ``raw-echo``: a plain TCP socket that echoes fixed-size messages (round-trip reference).
* ``node``: a gossamer node on 127.0.0.1 with an echo RPC service; with ``--sink-mb``
  it also receives that many MB per round through the data plane into preallocated memory.

Each role prints one JSON line (its port or address) on stdout when ready, then
serves until stdin closes, so the parent's exit always ends the child.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
from pathlib import Path

import trio


def _print_ready(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _exit_when_stdin_closes() -> None:
    def watch() -> None:
        sys.stdin.read()
        import os

        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def raw_sink(round_bytes: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    _print_ready(port=server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(1 << 20))
    while True:
        got = 0
        while got < round_bytes:
            n = conn.recv_into(buffer[: min(len(buffer), round_bytes - got)])
            if n == 0:
                return
            got += n
        conn.sendall(b"k")


def raw_echo(size: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    _print_ready(port=server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return
            data += chunk
        conn.sendall(data)


async def node_role(sink_mb: int, tensors: int, direct: bool) -> None:
    from gossamer.node import CallContext, Node, NodeConfig, Service
    from gossamer.node.rpc import rpc

    class Echo(Service):
        name = "bench-echo"

        @rpc
        async def echo(self, ctx: CallContext, data: bytes) -> bytes:
            return data

    data_dir = Path(tempfile.mkdtemp(prefix="gossamer-bench-"))
    config = NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        dataplane_direct=direct,
        log_level="warning",
    )
    async with Node(config) as node:
        node.register(Echo())
        _print_ready(addr=node.addrs()[0], peer_id=node.peer_id)
        if sink_mb <= 0:
            await trio.sleep_forever()
        buffers = _prealloc(sink_mb, tensors)
        index = 0
        while True:
            # Receive round i into the same preallocated memory every time.
            await node.dataplane.recv(None, f"round-{index}", into=buffers)
            index += 1


def _prealloc(total_mb: int, count: int) -> dict[str, object]:
    per = (total_mb << 20) // count // 4
    try:
        import torch

        return {f"t{i}": torch.empty(per, dtype=torch.float32) for i in range(count)}
    except ImportError:
        import numpy as np

        return {f"t{i}": np.empty(per, dtype=np.float32) for i in range(count)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["raw-sink", "raw-echo", "node"])
    parser.add_argument("--round-bytes", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--sink-mb", type=int, default=0)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--no-direct", action="store_true")
    args = parser.parse_args()
    _exit_when_stdin_closes()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if args.role == "raw-sink":
        raw_sink(args.round_bytes)
    elif args.role == "raw-echo":
        raw_echo(args.size)
    else:
        trio.run(node_role, args.sink_mb, args.tensors, not args.no_direct)


if __name__ == "__main__":
    main()
