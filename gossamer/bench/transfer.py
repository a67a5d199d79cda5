"""``gossamer bench transfer``: data-plane throughput between two processes vs raw TCP.

Two processes on 127.0.0.1.  The reference is a plain Python socket loop
(``sendall`` of 1 MiB memoryviews into ``recv_into``), measured in the same
run on the same machine; the data plane moves the same bytes as named float32
tensors, encrypted (AES-256-GCM), into memory the receiver preallocated, and a
round ends only when the receiver has verified every byte and acknowledged.
The libp2p-stream fallback (what a relayed peer gets) is measured on a smaller
payload for contrast.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

import trio

from gossamer.bench._common import (
    median,
    peer_process,
    process_cpu_seconds,
    temp_node_config,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=int, default=256, help="payload per round, MB (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per method (median)")
    parser.add_argument("--tensors", type=int, default=4, help="tensors the payload is split into")
    parser.add_argument(
        "--fallback-mb", type=int, default=32, help="payload for the libp2p-fallback path"
    )


def _raw_tcp(total: int, rounds: int, payload: memoryview) -> tuple[list[float], float]:
    """MB/s per round, and CPU seconds per GB moved (both processes together)."""
    rates = []
    with (
        peer_process("raw-sink", "--round-bytes", str(total)) as ready,
        socket.create_connection(("127.0.0.1", ready["port"])) as conn,
    ):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk = 1 << 20
        for offset in range(0, total, chunk):  # warm-up round, not timed
            conn.sendall(payload[offset : offset + chunk])
        if conn.recv(1) != b"k":
            raise RuntimeError("raw sink closed early")
        cpu_start = time.process_time() + process_cpu_seconds(ready["_pid"])
        for _ in range(rounds):
            start = time.perf_counter()
            for offset in range(0, total, chunk):
                conn.sendall(payload[offset : offset + chunk])
            if conn.recv(1) != b"k":
                raise RuntimeError("raw sink closed early")
            rates.append(total / (time.perf_counter() - start) / 1e6)
        cpu = time.process_time() + process_cpu_seconds(ready["_pid"]) - cpu_start
    return rates, cpu / (total * rounds / 1e9)


def _make_tensors(total: int, count: int) -> dict[str, Any]:
    per = total // count // 4
    try:
        import torch

        torch.set_num_threads(1)
        return {f"t{i}": torch.rand(per, dtype=torch.float32) for i in range(count)}
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        return {f"t{i}": rng.random(per, dtype=np.float32) for i in range(count)}


async def _dataplane(
    mb: int, count: int, rounds: int, direct: bool
) -> tuple[list[float], str, float]:
    """MB/s per round, the path, and CPU seconds per GB moved (both processes together)."""
    from gossamer.node import Node

    tensors = _make_tensors(mb << 20, count)
    total = sum(t.nbytes for t in tensors.values())
    args = ["node", "--sink-mb", str(mb), "--tensors", str(count)]
    if not direct:
        args.append("--no-direct")
    rates, path = [], ""
    with peer_process(*args) as ready:
        async with Node(temp_node_config(dataplane_direct=direct)) as node:
            peer = await node.connect(ready["addr"])
            # round 0 is a warm-up: channel handshake, first-touch page faults
            await node.dataplane.send(peer, "round-0", tensors, timeout=300)
            cpu_start = time.process_time() + process_cpu_seconds(ready["_pid"])
            for index in range(1, rounds + 1):
                start = time.perf_counter()
                report = await node.dataplane.send(peer, f"round-{index}", tensors, timeout=300)
                rates.append(total / (time.perf_counter() - start) / 1e6)
                path = report.path
            cpu = time.process_time() + process_cpu_seconds(ready["_pid"]) - cpu_start
    return rates, path, cpu / (total * rounds / 1e9)


def run(args: argparse.Namespace) -> dict[str, Any]:
    total = (args.mb << 20) // args.tensors // 4 * 4 * args.tensors
    payload = memoryview(bytearray(total))
    raw, raw_cpu = _raw_tcp(total, args.rounds, payload)
    direct, path, cpu = trio.run(_dataplane, args.mb, args.tensors, args.rounds, True)
    fallback, fallback_path, _ = trio.run(_dataplane, args.fallback_mb, 1, 1, False)
    mb_per_s, raw_mb_per_s = median(direct), median(raw)
    return {
        "bench": "transfer",
        "payload_mb": round(total / 1e6, 1),
        "rounds": args.rounds,
        "mb_per_s": round(mb_per_s, 1),
        "raw_tcp_mb_per_s": round(raw_mb_per_s, 1),
        "ratio": round(mb_per_s / raw_mb_per_s, 3),
        "path": path,
        "all_mb_per_s": [round(r, 1) for r in direct],
        "all_raw_tcp_mb_per_s": [round(r, 1) for r in raw],
        # CPU seconds per GB, sender and receiver together: steadier than wall
        # time on a shared machine (what another tenant takes does not count)
        "cpu_s_per_gb": round(cpu, 3),
        "raw_tcp_cpu_s_per_gb": round(raw_cpu, 3),
        "cpu_ratio": round(raw_cpu / cpu, 3),
        "libp2p_fallback_mb_per_s": round(median(fallback), 1),
        "libp2p_fallback_path": fallback_path,
        "encryption": "AES-256-GCM, keys from a handshake over the Noise-secured libp2p stream",
        "goal_ratio": 0.45,
    }
