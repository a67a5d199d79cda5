"""``gossamer bench attack``: a node under a mixed flood from hostile peers, for minutes.

The target (``_fuzz_target``: DHT, a run document, state sync, an expert host, the relay hop
service) runs in its own process.  Before the flood an honest peer stores a DHT record and
writes its member record into the run; then ``--attackers`` hostile nodes (8) send, as fast as
the target takes them, what the fuzz campaign generates for every protocol, and a stream of
half-open TCP connections comes from another address; meanwhile the honest peer calls the
target every 100 ms.  Reported: the target's RSS over time and its peak (the bound to hold),
the honest peer's RPC latency (p50/p99; goal p99 < 50 ms) and how many calls failed, whether
the DHT record and the run document entries are intact afterwards, the inputs sent, and the
lines the target logged (at info, a daemon's default).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import time
from typing import Any

import trio

from gossamer.bench._common import peer_process, percentile, temp_node_config
from gossamer.bench._mutate import Mutator
from gossamer.bench.fuzz import (
    PROTOCOLS,
    TARGET,
    _protocols,
    _rss_kb,
    _send,
    log_lines,
    target_log,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the flood lasts")
    parser.add_argument("--attackers", type=int, default=8, help="hostile peers")
    parser.add_argument("--half-open", type=int, default=200, help="half-open sockets kept open")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return trio.run(_attack, args.minutes * 60, args.attackers, args.half_open, args.seed)


async def _attack(seconds: float, attackers: int, half_open: int, seed: int) -> dict[str, Any]:
    from gossamer.crdt import attach_stack
    from gossamer.dht import DHT
    from gossamer.node import GossamerError, Node, PeerUnreachable

    result: dict[str, Any] = {"bench": "attack", "seconds": seconds, "attackers": attackers}
    log = target_log()
    result["target_log"] = log.name
    with log, peer_process(module=TARGET, stderr=log) as ready:
        target = ready["_process"]
        known = _protocols(ready)
        port = int(ready["addr"].split("/tcp/")[1].split("/")[0])
        async with contextlib.AsyncExitStack() as stack:
            honest = await stack.enter_async_context(Node(temp_node_config()))
            await honest.connect(ready["addr"])
            crdt = await attach_stack(honest, resume=False)
            assert crdt is not None
            dht = honest.service(DHT)
            assert dht is not None
            key = "/gossamer/run/attack-canary"
            await dht.put(key, {"canary": 1}, time.time() + 3600)
            run = await crdt.join_run(ready["run_id"], bootstrap=[ready["addr"]], timeout=30)
            hostile = [
                await stack.enter_async_context(Node(temp_node_config())) for _ in range(attackers)
            ]
            for node in hostile:
                with contextlib.suppress(GossamerError):
                    await node.connect(ready["addr"])
            sent = [0]
            latencies: list[float] = []
            failures = [0]
            rss: list[tuple[float, float]] = []
            started = time.perf_counter()
            deadline = trio.current_time() + seconds

            async def flood(node: Any, index: int) -> None:
                mutator = Mutator(random.Random(f"{seed}/{index}"))
                names = list(PROTOCOLS)
                while trio.current_time() < deadline:
                    protocol_id, protocol = known[mutator.rng.choice(names)]
                    _, data = mutator.input(protocol)
                    await _send(node, ready["peer_id"], protocol_id, data, PeerUnreachable)
                    sent[0] += 1
                    if not node.is_connected(ready["peer_id"]):
                        with contextlib.suppress(GossamerError):
                            await node.connect(ready["addr"])

            async def half_open_flood() -> None:
                sockets: list[socket.socket] = []
                try:
                    while trio.current_time() < deadline:
                        for sock in list(sockets):
                            with contextlib.suppress(BlockingIOError, OSError):
                                if sock.recv(1, socket.MSG_PEEK) == b"":
                                    sockets.remove(sock)
                                    sock.close()
                        for _ in range(min(50, half_open - len(sockets))):
                            sock = socket.socket()
                            sock.setblocking(False)
                            sock.bind(("127.0.1.9", 0))
                            with contextlib.suppress(BlockingIOError, OSError):
                                sock.connect(("127.0.0.1", port))
                            sockets.append(sock)
                        await trio.sleep(0.1)
                finally:
                    for sock in sockets:
                        sock.close()

            async def honest_calls() -> None:
                while trio.current_time() < deadline:
                    start = time.perf_counter()
                    try:
                        await honest.call(ready["peer_id"], "node", "ping", {"nonce": 1}, timeout=5)
                        latencies.append((time.perf_counter() - start) * 1000)
                    except GossamerError:
                        failures[0] += 1
                    await trio.sleep(0.1)

            async def sample_rss() -> None:
                while trio.current_time() < deadline:
                    rss.append(
                        (round(time.perf_counter() - started, 1), _rss_kb(target.pid)[0] / 1024)
                    )
                    await trio.sleep(5)

            async with trio.open_nursery() as nursery:
                for i, node in enumerate(hostile):
                    nursery.start_soon(flood, node, i)
                nursery.start_soon(half_open_flood)
                nursery.start_soon(honest_calls)
                nursery.start_soon(sample_rss)
            await trio.sleep(1)
            record = await dht.get(key)
            peers = run.doc.members()
            result.update(
                {
                    "target_alive": target.poll() is None,
                    "inputs_sent": sent[0],
                    "honest_calls": len(latencies) + failures[0],
                    "honest_failed": failures[0],
                    "honest_p50_ms": round(percentile(latencies, 50), 2),
                    "honest_p99_ms": round(percentile(latencies, 99), 2),
                    "rss_mb_over_time": rss,
                    "rss_peak_mb": round(_rss_kb(target.pid)[1] / 1024, 1),
                    "dht_record_intact": record is not None and record.value == {"canary": 1},
                    "run_member_intact": honest.peer_id in peers,
                    # at a daemon's level (info): one line per hostile peer per minute is the rule
                    "target_log_lines": log_lines(log.name),
                }
            )
    return result
