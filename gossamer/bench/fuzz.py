"""``gossamer fuzz [PROTOCOL…] --inputs N`` (also ``gossamer bench fuzz``): attack a real node
through real streams with generated inputs, and report what it survived.

The target is a separate process (``_fuzz_target``: a node with the DHT, a run document, state
sync, an expert host, the relay hop service and hole punching).  For each protocol the attacker
opens libp2p streams to it and writes inputs the mutation fuzzer (``_mutate``) derives from valid
messages; an honest node checks after every batch that the target still answers.  Per protocol:
inputs sent, inputs the target refused or dropped (stream reset, an error answer), inputs it
answered, target crashes (goal 0), the target's peak RSS, and whether it served the honest peer
at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
from collections import Counter
from typing import Any

import msgpack
import trio

from gossamer.bench._common import peer_process, temp_node_config
from gossamer.bench._mutate import Mutator, Protocol

PROTOCOLS = ("rpc", "dht", "statesync", "ddm", "crdt", "dataplane", "relay", "dcutr")
CONCURRENCY = 16  # streams in flight at once
READ_TIMEOUT_S = 0.1  # an answer comes at once or not at all (the target waits for more bytes)
TARGET = "gossamer.bench._fuzz_target"  # the node attacked, in its own process
LIVENESS_EVERY = 500  # inputs between honest checks
LOOPBACK_4001 = bytes.fromhex("047f000001060fa1")  # /ip4/127.0.0.1/tcp/4001 as a multiaddr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("protocols", nargs="*", metavar="PROTOCOL", help=f"of {PROTOCOLS}")
    parser.add_argument("--inputs", type=int, default=2000, help="inputs per protocol")
    parser.add_argument("--seconds", type=float, default=None, help="time limit per protocol")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    chosen = list(args.protocols) or list(PROTOCOLS)
    unknown = sorted(set(chosen) - set(PROTOCOLS))
    if unknown:
        from gossamer.node import GossamerError

        raise GossamerError(f"unknown protocol(s) {', '.join(unknown)} (of {', '.join(PROTOCOLS)})")
    return trio.run(_campaign, chosen, args.inputs, args.seconds, args.seed)


# ------------------------------------------------------------------ protocols


def _rpc_frame(obj: Any) -> bytes:
    from gossamer.node.wire import frame

    return frame(msgpack.packb(obj, use_bin_type=True))


def _protocols(ready: dict[str, Any]) -> dict[str, tuple[str, Protocol]]:
    """name -> (libp2p protocol id, what the fuzzer knows of it)."""
    from gossamer.crdt.protocol import PROTOCOL as CRDT
    from gossamer.crdt.protocol import hello_message
    from gossamer.node import _libp2p_compat as compat
    from gossamer.node.dataplane.plane import PROTOCOL as DATAPLANE
    from gossamer.node.dataplane.plane import VERSION
    from gossamer.node.holepunch import DCUTR_PROTOCOL
    from gossamer.node.identity import peer_id_to_bytes
    from gossamer.node.relay_wire import HOP_PROTOCOL

    def rpc(calls: list[dict[str, Any]]) -> Protocol:
        return Protocol("rpc", [_rpc_frame(c) for c in calls], calls, _rpc_frame)

    target = peer_id_to_bytes(ready["peer_id"])
    ping = {"i": 1, "m": "ping", "p": {"nonce": 7}, "t": 5000}
    pb = compat.circuit_pb()
    hole = compat.dcutr_hole_punch()

    def delimited(message: Any) -> bytes:
        body = message.SerializeToString()
        length, prefix = len(body), bytearray()
        while True:
            byte = length & 0x7F
            length >>= 7
            prefix.append(byte | (0x80 if length else 0))
            if not length:
                return bytes(prefix) + body

    hello = [1, 1, ready["run_id"], None, None]
    return {
        "rpc": ("/gossamer/node/1.0.0", rpc([ping, {"i": 2, "m": "info", "p": {}}])),
        "dht": (
            "/gossamer/dht/1.0.0",
            rpc(
                [
                    {"i": 1, "m": "find_node", "p": {"target": os.urandom(32)}},
                    {"i": 2, "m": "find_value", "p": {"key": "/gossamer/run/x"}},
                    {"i": 3, "m": "store", "p": {"key": "/gossamer/run/x", "entries": []}},
                    {"i": 4, "m": "hello", "p": {"addrs": ["/ip4/127.0.0.1/tcp/1"]}},
                ]
            ),
        ),
        "statesync": (
            "/gossamer/statesync/1.0.0",
            rpc(
                [
                    {"i": 1, "m": "manifest", "p": {"digest": ready["digest"]}},
                    {
                        "i": 2,
                        "m": "send",
                        "p": {"digest": ready["digest"], "chunks": [0], "tag": "ss/x"},
                    },
                ]
            ),
        ),
        "ddm": (
            "/gossamer/ddm/1.0.0",
            rpc(
                [
                    {"i": 1, "m": "describe", "p": {}},
                    {"i": 2, "m": "fetch", "p": {"cid": ready["cid"], "offset": 0, "length": 64}},
                    {
                        "i": 3,
                        "m": "denoise",
                        "p": {
                            "cid": ready["cid"],
                            "shape": [1, 1, 8, 8],
                            "dtype": "float32",
                            "t": b"\x00" * 4,
                            "x": b"\x00" * 256,
                        },
                    },
                ]
            ),
        ),
        "crdt": (
            CRDT,
            Protocol(
                "crdt",
                [hello_message(ready["run_id"], None, None)],
                [hello],
                _rpc_frame,
            ),
        ),
        "dataplane": (
            DATAPLANE,
            rpc([{"v": VERSION, "n": os.urandom(32), "d": False}]),
        ),
        "relay": (
            HOP_PROTOCOL,
            Protocol(
                "relay",
                [
                    delimited(pb.HopMessage(type=pb.HopMessage.RESERVE)),
                    delimited(pb.HopMessage(type=pb.HopMessage.CONNECT, peer=pb.PeerId(id=target))),
                ],
            ),
        ),
        "dcutr": (
            DCUTR_PROTOCOL,
            Protocol(
                "dcutr",
                [
                    delimited(
                        hole(type=hole.CONNECT, ObsAddrs=[b"\x04\x7f\x00\x00\x01\x06\x0f\xa1"])
                    )
                ],
            ),
        ),
    }


# ------------------------------------------------------------------ the campaign


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB (0, 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return 0, 0
    return (
        int(fields.get("VmRSS", "0 kB").split()[0]),
        int(fields.get("VmHWM", "0 kB").split()[0]),
    )


async def _campaign(
    protocols: list[str], inputs: int, seconds: float | None, seed: int
) -> dict[str, Any]:
    from gossamer.node import Node, PeerUnreachable

    result: dict[str, Any] = {"bench": "fuzz", "seed": seed, "protocols": {}}
    log = target_log()
    result["target_log"] = log.name
    with log, peer_process(module=TARGET, stderr=log) as ready:
        target = ready["_process"]
        known = _protocols(ready)
        async with (
            Node(temp_node_config()) as attacker,
            Node(temp_node_config()) as honest,
        ):
            await attacker.connect(ready["addr"])
            await honest.connect(ready["addr"])
            for name in protocols:
                protocol_id, protocol = known[name]
                mutator = Mutator(random.Random(f"{seed}/{name}"))
                lines_before = log_lines(log.name)
                stats = await _fuzz_one(
                    attacker, honest, target, ready, protocol_id, protocol, mutator,
                    inputs, seconds, PeerUnreachable,
                )  # fmt: skip
                # what the target logged at its default level (info) for these inputs: one
                # line per peer per minute is the rule, a line per input the disk-filling tool
                stats["target_log_lines"] = log_lines(log.name) - lines_before
                result["protocols"][name] = stats
                if target.poll() is not None:
                    break
        result["target_crashed"] = target.poll() is not None
        result["crashes"] = sum(p["crashes"] for p in result["protocols"].values())
        result["inputs"] = sum(p["inputs"] for p in result["protocols"].values())
        result["rss_peak_mb"] = round(_rss_kb(target.pid)[1] / 1024, 1)
    result["target_log_lines"] = log_lines(log.name)
    return result


def target_log() -> Any:
    """A file for the target's log (kept after the run, for a look at what it wrote)."""
    import tempfile

    return tempfile.NamedTemporaryFile(
        "w", prefix="gossamer-fuzz-target-", suffix=".log", delete=False
    )


def log_lines(path: str) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


async def _fuzz_one(
    attacker: Any,
    honest: Any,
    target: subprocess.Popen[str],
    ready: dict[str, Any],
    protocol_id: str,
    protocol: Protocol,
    mutator: Mutator,
    inputs: int,
    seconds: float | None,
    unreachable: type[Exception],
) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    peer = ready["peer_id"]
    started = time.perf_counter()
    deadline = started + seconds if seconds else float("inf")
    crashes = 0
    sent = 0
    limiter = trio.Semaphore(CONCURRENCY)

    async def one(data: bytes) -> None:
        async with limiter:
            outcomes[await _send(attacker, peer, protocol_id, data, unreachable)] += 1

    while sent < inputs and time.perf_counter() < deadline:
        batch = min(LIVENESS_EVERY, inputs - sent)
        async with trio.open_nursery() as nursery:
            for _ in range(batch):
                kind, data = mutator.input(protocol)
                kinds[kind] += 1
                nursery.start_soon(one, data)
                if time.perf_counter() > deadline:
                    break
        sent = sum(kinds.values())
        if target.poll() is not None:
            crashes += 1
            break
        if not attacker.is_connected(peer):
            # the target may close a misbehaving peer's connection: that is allowed, dial again
            try:
                await attacker.connect(ready["addr"])
            except unreachable:
                outcomes["attacker_refused"] += 1
    served = await _honest_check(honest, peer, ready, unreachable)
    if not served and target.poll() is None:
        crashes += 1  # alive but not serving counts as a crash
    elapsed = time.perf_counter() - started
    return {
        "inputs": sent,
        "inputs_per_s": round(sent / elapsed, 1) if elapsed else 0.0,
        "kinds": dict(kinds),
        "outcomes": dict(outcomes),
        "crashes": crashes,
        "served_honest_after": served,
        "target_rss_mb": round(_rss_kb(target.pid)[0] / 1024, 1),
    }


async def _send(
    node: Any, peer: str, protocol_id: str, data: bytes, unreachable: type[Exception]
) -> str:
    """Write one input on a fresh stream; what became of it: answered, refused or open."""
    try:
        with trio.fail_after(5):
            stream = await node.open_stream(peer, protocol_id)
    except (unreachable, trio.TooSlowError):
        return "stream_refused"
    try:
        await stream.write(data)
        with trio.move_on_after(READ_TIMEOUT_S):
            answer = await stream.read(65536)
            return "answered" if answer else "closed"
        return "no_answer"
    except ConnectionError:
        return "reset"
    finally:
        await stream.reset()


async def _honest_check(honest: Any, peer: str, ready: dict[str, Any], unreachable: Any) -> bool:
    from gossamer.node import GossamerError

    try:
        if not honest.is_connected(peer):
            await honest.connect(ready["addr"])
        await honest.ping(peer, timeout=10)
        info = await honest.call(peer, "ddm", "describe", {}, timeout=10)
        return isinstance(info, dict)
    except (GossamerError, unreachable):
        return False
