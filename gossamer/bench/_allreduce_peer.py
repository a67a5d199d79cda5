"""One member of ``gossamer bench allreduce``: ``python -m gossamer.bench._allreduce_peer I N``.

Talks to the parent in JSON lines: prints ``ready`` (its address, peer id and raw TCP port),
reads ``peers`` (everyone's), connects, prints ``connected``, reads ``go`` and then runs the
trials on its own: for each repetition and method (raw TCP exchange of the same bytes, then the
all-reduce with each codec), a barrier (a tiny all-reduce), the timed operation, and one
``trial`` line. Exits when its stdin closes.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import trio

from gossamer.node import Node, NodeConfig
from gossamer.training import all_reduce


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _read_line() -> dict[str, Any]:
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    if not line:
        os._exit(0)
    return json.loads(line)


class RawMesh:
    """Plain TCP sockets to every other member: the reference for moving the same bytes."""

    def __init__(self, index: int, n: int) -> None:
        self.index, self.n = index, n
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.socks: dict[int, socket.socket] = {}

    def connect(self, ports: list[int]) -> None:
        def accept() -> None:
            for _ in range(self.index):
                conn, _ = self.server.accept()
                peer = int.from_bytes(conn.recv(1), "big")
                self.socks[peer] = conn

        thread = threading.Thread(target=accept)
        thread.start()
        for j in range(self.index + 1, self.n):
            s = socket.create_connection(("127.0.0.1", ports[j]))
            s.sendall(bytes([self.index]))
            self.socks[j] = s
        thread.join()
        for s in self.socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exchange(self, payload: memoryview, inbox: dict[int, memoryview]) -> None:
        """Send ``payload`` to every other member and receive theirs, all at once."""

        def send(s: socket.socket) -> None:
            for offset in range(0, len(payload), 1 << 20):
                s.sendall(payload[offset : offset + (1 << 20)])

        def recv(s: socket.socket, into: memoryview) -> None:
            got = 0
            while got < len(into):
                n = s.recv_into(into[got:], min(len(into) - got, 1 << 20))
                if n == 0:
                    raise ConnectionError("peer closed")
                got += n

        threads = [threading.Thread(target=send, args=(s,)) for s in self.socks.values()]
        threads += [
            threading.Thread(target=recv, args=(s, inbox[j])) for j, s in self.socks.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


async def main(index: int, n: int, numel: int, repeats: int, codecs: list[str]) -> None:
    from gossamer.training import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(index))
    raw = RawMesh(index, n)
    config = NodeConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="gossamer-bench-ar-")),
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        log_level="warning",
    )
    async with Node(config) as node:
        _emit("ready", addr=node.addrs()[0], peer_id=node.peer_id, raw_port=raw.port)
        peers = await _read_line()
        for addr in peers["addrs"][index + 1 :]:
            await node.connect(addr)
        await trio.to_thread.run_sync(raw.connect, peers["raw_ports"])
        members = peers["ids"]
        # Everything allocated so far (imports, the node) lives for the whole run: keep the
        # garbage collector from walking it again and again (it was ~12% of the CPU here).
        gc.collect()
        gc.freeze()
        _emit("connected")
        await _read_line()  # go
        # each member sends 2(n-1)/n of the vector in a ring-like all-reduce: the raw reference
        # moves exactly that many bytes, split evenly over the other members, all at once
        share = (2 * (n - 1) * numel * 4 // n) // (n - 1)
        payload = memoryview((bytearray(os.urandom(1 << 20)) * ((share >> 20) + 1))[:share])
        inbox = {j: memoryview(bytearray(len(payload))) for j in range(n) if j != index}
        tiny = torch.ones(256)
        # rep -1 is an untimed warm-up of every method: data channels, first-touch page
        # faults and allocator growth would otherwise land in the first timed trial
        for rep in range(-1, repeats):
            for method in ["raw", *codecs]:
                await all_reduce(node, f"barrier/{method}/{rep}", members, tiny, 1.0)
                start, cpu_start = time.perf_counter(), time.process_time()
                if method == "raw":
                    await trio.to_thread.run_sync(raw.exchange, payload, inbox)
                    sent, attempts = len(payload) * (n - 1), 1
                else:
                    result = await all_reduce(
                        node, f"{method}/{rep}", members, flat, 1.0, codec=method
                    )
                    sent, attempts = result.bytes_sent, result.attempts
                    assert len(result.members) == n
                seconds = time.perf_counter() - start
                cpu = time.process_time() - cpu_start  # all threads of this process
                if rep < 0:
                    continue
                _emit(
                    "trial",
                    method=method,
                    rep=rep,
                    seconds=seconds,
                    cpu=cpu,
                    sent=sent,
                    attempts=attempts,
                )
        await all_reduce(node, "barrier/end", members, tiny, 1.0)
        _emit("done")


if __name__ == "__main__":
    idx, count, elems, reps = (int(a) for a in sys.argv[1:5])
    trio.run(main, idx, count, elems, reps, sys.argv[5].split(","))
