"""Run-document replication: propagation time, healing after partitions, envelope overhead.

``gossamer bench crdt --json`` starts ``--members`` nodes (default 20) in this
process on 127.0.0.1, hosts a run on the first and joins the others through
it, then measures:

* ``propagation_p50_ms`` / ``_p90_ms``: from one member's write until every
  member has applied it (pushes over the mesh only; anti-entropy off), over
  ``--updates`` writes by random members.  Goal ≤ 100 ms.
* ``rounds_to_converge_max`` / ``_mean``: the members are split into 2–4
  random sides (a peer filter on every node closes the links between sides),
  every member writes on its own side, the split heals, and each round every
  member does one anti-entropy exchange with a random member and the mesh
  floods what arrives; counted until all states are identical.  Goal ≤ 2.
* ``envelope_overhead_bytes``: frame bytes minus update bytes per envelope
  actually sent during the run (the author key travels once per link and
  author), and the fixed sizes with and without the key.  Goal ≤ 120 B.

References measured in the same run: ``rpc_rtt_p50_ms`` (a small RPC round
trip between two of the same nodes) and the cost of one update through our
checks (decode, signature, rules, apply) against a bare pycrdt apply.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", type=int, default=20, help="nodes in the run (default 20)")
    parser.add_argument("--updates", type=int, default=30, help="writes timed for propagation")
    parser.add_argument("--partitions", type=int, default=3, help="partition/heal trials")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    logging.getLogger("gossamer").setLevel(logging.ERROR)
    result: dict[str, Any] = {}
    trio.run(_main, args, result)
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _main(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import trio

    from gossamer.crdt import CrdtService, SyncOptions, Verdict
    from gossamer.node import Node, NodeConfig

    rng = random.Random(args.seed)
    random.seed(args.seed)
    options = SyncOptions(
        anti_entropy_interval=0,  # rounds are driven by hand below
        heartbeat_interval=0,
        maintain_interval=0.2,
        dial_backoff=1.0,
    )
    with tempfile.TemporaryDirectory(prefix="gossamer-bench-crdt-") as tmp:
        async with _nodes(Path(tmp), args.members, Node, NodeConfig) as nodes:
            started = time.perf_counter()
            services = [await CrdtService.start(n, options, resume=False) for n in nodes]
            host = await services[0].host_run("bench", config={"model": {"layers": 2}})
            bootstrap = [services[0].node.addrs()[0]]
            runs = [host]
            for service in services[1:]:
                runs.append(await service.join_run(host.run_id, bootstrap=bootstrap))
            result["members"] = args.members
            result["setup_s"] = round(time.perf_counter() - started, 2)

            async def settle(timeout: float = 10.0) -> bool:
                with trio.move_on_after(timeout):
                    while True:
                        svs = [r.replica.state_vector() for r in runs]
                        if all(sv == svs[0] for sv in svs):
                            return True
                        await trio.sleep(0.02)
                return False

            await settle()
            # Let the mesh reach its degree (members dial each other from the member records).
            with trio.move_on_after(5):
                while min(len(r.linked_peers()) for r in runs) < options.mesh_low:
                    await trio.sleep(0.05)
            degrees = [len(r.linked_peers()) for r in runs]
            result["mesh_degree_min"] = min(degrees)
            result["mesh_degree_mean"] = round(statistics.mean(degrees), 1)

            # ------------------------------------------------- propagation
            arrivals: dict[int, float] = {}
            target: dict[str, Any] = {}

            def make_listener(index: int):
                def listener(receipt: Any, source: Any) -> None:
                    env = receipt.envelope
                    if (
                        receipt.verdict is Verdict.APPLIED
                        and env is not None
                        and (env.client, env.span[1]) == target.get("id")
                    ):
                        arrivals[index] = time.perf_counter()
                        if len(arrivals) == len(runs):
                            target["done"].set()

                return listener

            for index, r in enumerate(runs):
                r.replica.add_listener(make_listener(index))
            latencies = []
            phase = time.perf_counter()
            dup_before = sum(r.stats["duplicates"] for r in runs)
            for step in range(args.updates):
                author = rng.randrange(len(runs))
                arrivals.clear()
                target["done"] = trio.Event()
                target["id"] = None
                # The write applies locally inside report_metrics; compute its id first.
                me = runs[author].replica.client_id
                target["id"] = (me, runs[author].replica.clock_of(me) + 1)
                t0 = time.perf_counter()
                runs[author].doc.report_metrics(step=step, loss=1.0 / (step + 1), tokens=step)
                with trio.move_on_after(5):
                    await target["done"].wait()
                if len(arrivals) == len(runs):
                    latencies.append((max(arrivals.values()) - t0) * 1000)
                await trio.sleep(0.05)
            result["propagation_phase_s"] = round(time.perf_counter() - phase, 2)
            # Flooding a mesh delivers some copies twice; per member and update:
            result["propagation_duplicates_per_member"] = round(
                (sum(r.stats["duplicates"] for r in runs) - dup_before)
                / max(1, args.updates * (len(runs) - 1)),
                2,
            )
            result["propagation_updates"] = len(latencies)
            result["propagation_lost"] = args.updates - len(latencies)
            if latencies:
                result["propagation_p50_ms"] = round(statistics.median(latencies), 2)
                result["propagation_p90_ms"] = round(_percentile(latencies, 0.9), 2)

            # --------------------------------------------- reference: RPC RTT
            a, b = services[1].node, services[2].node
            await a.connect(b.addrs()[0])
            rtts = [await a.ping(b.peer_id) for _ in range(50)]
            result["rpc_rtt_p50_ms"] = round(statistics.median(rtts), 3)
            if latencies:
                result["propagation_vs_rpc_rtt"] = round(
                    result["propagation_p50_ms"] / result["rpc_rtt_p50_ms"], 1
                )

            # ----------------------------------------- partitions and healing
            phase = time.perf_counter()
            rounds_needed = []
            for trial in range(args.partitions):
                sides_count = 2 + trial % 3
                peers = [s.node.peer_id for s in services]
                shuffled = peers[:]
                rng.shuffle(shuffled)
                side = {p: i % sides_count for i, p in enumerate(shuffled)}
                for s in services:
                    mine = side[s.node.peer_id]
                    s.set_peer_filter(lambda p, mine=mine, side=side: side.get(p) == mine)
                await trio.sleep(0.3)
                for i, r in enumerate(runs):  # concurrent edits on every side
                    r.doc.report_metrics(step=1000 + trial, loss=float(i), tokens=i)
                    r.doc.enter_round(10 * (trial + 1) + rng.randrange(5), "training")
                await trio.sleep(0.5)
                for s in services:
                    s.set_peer_filter(None)
                rounds = 0
                while rounds < 10:
                    prints = [r.replica.state_vector() for r in runs]
                    if all(p == prints[0] for p in prints):
                        break
                    rounds += 1
                    async with trio.open_nursery() as nursery:
                        for r in runs:
                            nursery.start_soon(r.anti_entropy_once)
                    await _quiesce(runs)
                same = all(r.replica.fingerprint() == runs[0].replica.fingerprint() for r in runs)
                rounds_needed.append(rounds if same else 99)
            result["partition_phase_s"] = round(time.perf_counter() - phase, 2)
            result["partition_sides"] = [2 + t % 3 for t in range(args.partitions)]
            result["rounds_to_converge"] = rounds_needed
            result["rounds_to_converge_max"] = max(rounds_needed) if rounds_needed else None
            result["rounds_to_converge_mean"] = (
                round(statistics.mean(rounds_needed), 2) if rounds_needed else None
            )

            # ------------------------------------------------ envelope sizes
            sent = sum(r.stats["envelopes_sent"] for r in runs)
            frame_bytes = sum(r.stats["envelope_bytes_sent"] for r in runs)
            update_bytes = sum(r.stats["update_bytes_sent"] for r in runs)
            result["envelopes_sent"] = sent
            result["envelope_overhead_bytes"] = round(
                (frame_bytes - update_bytes) / max(1, sent), 1
            )
            sample = runs[1].doc.report_metrics(step=1, loss=1.0)
            from gossamer.node import wire

            result["envelope_overhead_bytes_without_key"] = len(
                wire.frame(sample.to_wire(False))
            ) - len(sample.update)
            result["envelope_overhead_bytes_with_key"] = len(
                wire.frame(sample.to_wire(True))
            ) - len(sample.update)
            result["update_bytes_typical"] = len(sample.update)
            result["duplicates_received"] = sum(r.stats["duplicates"] for r in runs)
            result["envelopes_skipped"] = sum(r.stats["envelopes_skipped"] for r in runs)
            result["applied"] = sum(r.stats["applied"] for r in runs)
            teardown = time.perf_counter()
        result["teardown_s"] = round(time.perf_counter() - teardown, 2)

    result.update(_apply_costs())
    result["goals"] = {
        "propagation_p50_ms": 100,
        "rounds_to_converge": 2,
        "envelope_overhead_bytes": 120,
    }


@contextlib.asynccontextmanager
async def _nodes(tmp: Path, count: int, Node: Any, NodeConfig: Any) -> Any:
    """Start ``count`` nodes, each in its own task, so they stop concurrently at the end
    (a node's stop takes ~0.2 s per open connection; one after another, 20 meshed nodes
    would take half a minute)."""
    import trio

    async def serve(config: Any, stop: trio.Event, task_status: Any) -> None:
        async with Node(config) as node:
            task_status.started(node)
            await stop.wait()

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(count):
            config = NodeConfig(
                data_dir=tmp / f"n{i}",
                listen=["/ip4/127.0.0.1/tcp/0"],
                dataplane_listen="127.0.0.1:0",
            )
            nodes.append(await nursery.start(serve, config, stop))
        try:
            yield nodes
        finally:
            stop.set()


async def _quiesce(runs: list[Any], quiet: float = 0.15, limit: float = 5.0) -> None:
    """Wait until no replica applied anything for ``quiet`` seconds."""
    import trio

    def total() -> int:
        return sum(r.stats["applied"] + r.stats["duplicates"] for r in runs)

    deadline = trio.current_time() + limit
    last = total()
    while trio.current_time() < deadline:
        await trio.sleep(quiet)
        now = total()
        if now == last:
            return
        last = now


def _apply_costs(n: int = 300) -> dict[str, Any]:
    """One update through our checks vs a bare pycrdt apply (the reference)."""
    from pycrdt import Doc

    from gossamer.crdt import Charter, Replica, RunDocument
    from gossamer.node import Identity

    author = Identity.generate()
    charter = Charter.create(author, "costs")
    doc = RunDocument(Replica(charter, author))
    envelopes = [doc.report_metrics(step=i, loss=1.0, tokens=i) for i in range(n)]
    receiver = Replica(charter, Identity.generate())
    t0 = time.perf_counter()
    for envelope in envelopes:
        fresh = type(envelope)(envelope.author, envelope.signature, envelope.update)
        receiver.receive(fresh)
    ours = (time.perf_counter() - t0) / n
    bare = Doc()
    t0 = time.perf_counter()
    for envelope in envelopes:
        bare.apply_update(envelope.update)
    reference = (time.perf_counter() - t0) / n
    return {
        "receive_us": round(ours * 1e6, 1),
        "pycrdt_apply_us": round(reference * 1e6, 1),
        "receive_vs_pycrdt_apply": round(ours / reference, 1),
    }
