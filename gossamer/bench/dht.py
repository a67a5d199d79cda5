"""``gossamer bench dht``: DHT store/get latency (4 processes) and lookups under churn (100 nodes).

Part a — 4 nodes, each in its own process, on loopback.  This process runs one
node and times ``put`` and ``get(latest=True)`` of distinct keys (every node
stores every key: k=20 > 4, and a latest get needs answers from two other
replicas, so each op crosses processes).  The reference measured in the same
run is one RPC round trip (``node.ping``) to a worker process; published
figures of lattica and hivemind are included as constants, labelled as such.

Part b — ``--nodes`` (100) nodes in this process, each joining through one
random earlier node (the routing tables fill on their own).  ``--keys`` (1,000)
random keys are stored from random nodes, then each is read from a random
other node: ``success_before_churn``.  Then 30% of the nodes, chosen at random,
stop without a word (their sockets just close, as when a process is killed; no
republish runs in between) and every key is read again from a random survivor:
``success_after_churn``.  ``get_p50_ms_100`` is the median get before churn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

# Published figures (DESIGN.md, measured on this class of machine, 4 peers on
# loopback): references only, not re-measured here.
REFERENCE_LATTICA_STORE_MS = 2.4
REFERENCE_LATTICA_GET_MS = 2.5
REFERENCE_HIVEMIND_STORE_MS = 10.9
REFERENCE_HIVEMIND_GET_MS = 10.1
GOAL_STORE_MS, GOAL_GET_MS, GOAL_GET_100_MS, GOAL_SUCCESS = 5.0, 3.0, 20.0, 0.99


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=300, help="puts and gets timed in part a")
    parser.add_argument("--nodes", type=int, default=100, help="nodes in part b (0 skips it)")
    parser.add_argument("--keys", type=int, default=1000, help="keys stored in part b")
    parser.add_argument("--kill", type=float, default=0.3, help="fraction of nodes killed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-a", action="store_true", help="run part b only")


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _node_config(base: Path, name: str, **overrides: Any) -> Any:
    from gossamer.node.config import NodeConfig

    # NAT traversal (AutoNAT dial-backs, relay service and its DHT provider
    # record, hole punching) is off: on loopback it has nothing to do but
    # would add its own connections and records to what is measured.
    config = NodeConfig(
        data_dir=base / name,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        log_level="warning",
        max_connections=512,
        autonat=False,
        relay_service="off",
        relay_client=False,
        holepunch=False,
    )
    return config.replace(**overrides)


# ------------------------------------------------------------------ part a


async def _worker(join: str | None) -> None:
    """A node + DHT in its own process; prints its address, serves until stdin closes."""
    from gossamer.dht import DHT
    from gossamer.node.node import Node

    base = Path(tempfile.mkdtemp(prefix="gossamer-bench-dht-"))
    async with Node(_node_config(base, "w")) as node:
        await DHT.start(node)
        if join:
            await node.connect(join)
        sys.stdout.write(json.dumps({"addr": node.addrs()[0]}) + "\n")
        sys.stdout.flush()
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


def _spawn_worker(join: str | None = None) -> subprocess.Popen[str]:
    extra = ["--join", join] if join else []
    return subprocess.Popen(
        [sys.executable, "-m", "gossamer.bench.dht", "--worker", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def _part_a(ops: int) -> dict[str, Any]:
    from gossamer.dht import DHT
    from gossamer.node.node import Node

    procs = [_spawn_worker()]
    try:
        first_addr = json.loads(procs[0].stdout.readline())["addr"]  # type: ignore[union-attr]
        # Two more workers join through the first; this process joins through it too.
        procs += [_spawn_worker(first_addr) for _ in range(2)]
        addrs = (
            [first_addr]
            + [
                json.loads(p.stdout.readline())["addr"]  # type: ignore[union-attr]
                for p in procs[1:]
            ]
        )
        base = Path(tempfile.mkdtemp(prefix="gossamer-bench-dht-"))
        async with Node(_node_config(base, "main")) as node:
            dht = await DHT.start(node)
            # One bootstrap peer; the other two are found through the DHT.
            first = await node.connect(addrs[0])
            with trio.fail_after(20):
                while len(dht.table) < 3:
                    await trio.sleep(0.05)
            value = os.urandom(100)
            for i in range(30):  # warm-up: open and pool the streams
                await dht.put(f"/gossamer/bench/warm{i}", value, time.time() + 600)
                await dht.get(f"/gossamer/bench/warm{i}")
            rtt = []
            for _ in range(ops):
                start = time.perf_counter()
                await node.ping(first)
                rtt.append((time.perf_counter() - start) * 1000)
            store, get, stored_on, found = [], [], [], 0
            keys = [f"/gossamer/bench/{os.urandom(8).hex()}" for _ in range(ops)]
            for key in keys:
                start = time.perf_counter()
                stored_on.append(await dht.put(key, value, time.time() + 600))
                store.append((time.perf_counter() - start) * 1000)
            for key in keys:
                start = time.perf_counter()
                record = await dht.get(key, latest=True)
                get.append((time.perf_counter() - start) * 1000)
                found += record is not None and record.value == value
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    rtt_p50, store_p50, get_p50 = _p(rtt, 50), _p(store, 50), _p(get, 50)
    return {
        "a_nodes": 4,
        "a_processes": 4,
        "a_ops": ops,
        "store_p50_ms": round(store_p50, 3),
        "store_p90_ms": round(_p(store, 90), 3),
        "get_p50_ms": round(get_p50, 3),
        "get_p90_ms": round(_p(get, 90), 3),
        "get_found_fraction": round(found / ops, 4),
        "replicas_per_store_p50": _p([float(s) for s in stored_on], 50),
        "reference_rpc_rtt_p50_ms": round(rtt_p50, 3),
        "store_over_rtt": round(store_p50 / rtt_p50, 2),
        "get_over_rtt": round(get_p50 / rtt_p50, 2),
        "reference_published_lattica_store_ms": REFERENCE_LATTICA_STORE_MS,
        "reference_published_lattica_get_ms": REFERENCE_LATTICA_GET_MS,
        "reference_published_hivemind_store_ms": REFERENCE_HIVEMIND_STORE_MS,
        "reference_published_hivemind_get_ms": REFERENCE_HIVEMIND_GET_MS,
        "store_over_lattica": round(store_p50 / REFERENCE_LATTICA_STORE_MS, 2),
        "get_over_lattica": round(get_p50 / REFERENCE_LATTICA_GET_MS, 2),
        "goal_store_p50_ms": GOAL_STORE_MS,
        "goal_get_p50_ms": GOAL_GET_MS,
    }


# ------------------------------------------------------------------ part b


async def _part_b(count: int, keys: int, kill_fraction: float, seed: int) -> dict[str, Any]:
    from gossamer.dht import DHT, DHTConfig
    from gossamer.node.node import Node

    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="gossamer-bench-dht100-"))
    config = DHTConfig(persist=False)
    nodes: list[Any] = []
    scopes: dict[str, trio.CancelScope] = {}
    stopped: dict[str, trio.Event] = {}
    result: dict[str, Any] = {"b_nodes": count, "b_keys": keys, "b_processes": 1}
    started_at = time.perf_counter()

    async with trio.open_nursery() as nursery:

        async def run_node(index: int, task_status: Any) -> None:
            done = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    async with AsyncExitStack() as stack:
                        # The node's latency pings (every 30 s to every
                        # connected peer) would be ~200 pings/s across a
                        # hundred nodes sharing this one process: off here.
                        node = await stack.enter_async_context(
                            Node(_node_config(base, f"n{index}", ping_interval=3600.0))
                        )
                        await DHT.start(node, config)
                        task_status.started((node, scope, done))
                        await trio.sleep_forever()
            finally:
                done.set()

        # Join one at a time through a random earlier node, each waiting for
        # its join lookups to finish: all nodes share one CPU here, and a
        # hundred joins at once would only measure the run queue.  (This also
        # keeps dials in flight far under pitfall 11's limit.)
        for i in range(count):
            node, scope, done = await nursery.start(run_node, i)
            scopes[node.peer_id], stopped[node.peer_id] = scope, done
            if nodes:
                await node.connect(rng.choice(nodes).addrs()[0])
                with trio.move_on_after(30):
                    await node.dht.bootstrapped.wait()
            nodes.append(node)
        # Let the join lookups settle: stop when the tables stop growing.
        last, calm = -1, 0
        with trio.move_on_after(60):
            while calm < 4:
                await trio.sleep(0.5)
                total = sum(len(n.dht.table) for n in nodes)
                calm = calm + 1 if total == last else 0
                last = total
        sizes = [len(n.dht.table) for n in nodes]
        result["b_join_s"] = round(time.perf_counter() - started_at, 1)
        result["b_table_size_min"] = min(sizes)
        result["b_table_size_mean"] = round(sum(sizes) / len(sizes), 1)
        result["b_connections_mean"] = round(
            sum(len(n.connected_peers()) for n in nodes) / len(nodes), 1
        )

        # Store the keys from random nodes, a few at a time (one shared CPU).
        stored: dict[str, tuple[str, bytes]] = {}
        put_failures = 0
        limiter = trio.CapacityLimiter(2)

        async def put_one(key: str, writer: Any, value: bytes) -> None:
            nonlocal put_failures
            async with limiter:
                try:
                    await writer.dht.put(key, value, time.time() + 3600)
                    stored[key] = (writer.peer_id, value)
                except Exception:
                    put_failures += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as puts:
            for _ in range(keys):
                puts.start_soon(
                    put_one,
                    f"/gossamer/bench/{rng.getrandbits(64):016x}",
                    rng.choice(nodes),
                    os.urandom(32),
                )
        result["b_put_s"] = round(time.perf_counter() - t0, 1)
        result["b_put_failures"] = put_failures

        async def read_all(pool: list[Any]) -> tuple[float, list[float]]:
            ok, times = 0, []
            for key, (writer_id, value) in stored.items():
                reader = rng.choice([n for n in pool if n.peer_id != writer_id] or pool)
                start = time.perf_counter()
                try:
                    record = await reader.dht.get(key, latest=True)
                except Exception:
                    record = None
                times.append((time.perf_counter() - start) * 1000)
                ok += record is not None and record.value == value
            return ok / keys, times

        success, times = await read_all(nodes)
        result["success_before_churn"] = round(success, 4)
        result["get_p50_ms_100"] = round(_p(times, 50), 3)
        result["get_p90_ms_100"] = round(_p(times, 90), 3)

        victims = rng.sample(nodes, int(count * kill_fraction))
        for victim in victims:
            scopes[victim.peer_id].cancel()
        for victim in victims:
            await stopped[victim.peer_id].wait()
        survivors = [n for n in nodes if n not in victims]
        result["b_killed"] = len(victims)
        success, times = await read_all(survivors)
        result["success_after_churn"] = round(success, 4)
        result["get_p50_ms_100_after_churn"] = round(_p(times, 50), 3)
        result["get_p90_ms_100_after_churn"] = round(_p(times, 90), 3)
        result["b_total_s"] = round(time.perf_counter() - started_at, 1)
        result["b_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        nursery.cancel_scope.cancel()
    result["goal_success"] = GOAL_SUCCESS
    result["goal_get_p50_ms_100"] = GOAL_GET_100_MS
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    logging.getLogger("gossamer").setLevel(logging.ERROR)
    out: dict[str, Any] = {"bench": "dht"}
    if not args.skip_a:
        out.update(trio.run(_part_a, args.ops))
    if args.nodes > 0:
        out.update(trio.run(_part_b, args.nodes, args.keys, args.kill, args.seed))
    return out


if __name__ == "__main__":
    if "--worker" in sys.argv:
        import logging

        logging.getLogger("gossamer").setLevel(logging.ERROR)
        join = sys.argv[sys.argv.index("--join") + 1] if "--join" in sys.argv else None
        trio.run(_worker, join)
