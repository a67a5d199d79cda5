"""``gossamer demo``: two nodes on this machine connect and exchange a tensor.

Two worker processes (this module run with ``-m``), each a node with a
temporary data directory, listening on 127.0.0.1 only: A posts a receive, B
connects to A and sends a tensor through the data plane; A hashes what
arrived and the parent compares it with B's hash — equal means bit-exact.
Separate processes, not two nodes in one, so the transfer crosses a real
process boundary the way it does between two machines.

Nothing here touches a non-loopback address: the workers are built from an
explicit config (the user's TOML and ``GOSSAMER_*`` settings, which might
name bootstrap peers, are not read), listen on 127.0.0.1, and the only
address B dials is A's loopback one.

Workers talk to the parent in JSON lines: on stdout (worker → parent) and,
for B, one line on stdin (A's address).  A later issue replaces this demo
with a training demo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gossamer.cli.common import CliError, print_json
from gossamer.node.errors import GossamerError

TAG = "gossamer-demo"
WORKER_START_TIMEOUT_S = 30.0  # interpreter + libp2p (+ torch) imports on a busy 2-core box
DEMO_TIMEOUT_S = 90.0
MAX_LINE = 64 << 10


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="two local nodes connect and exchange a tensor (loopback only)"
    )
    parser.add_argument(
        "--size-mb", type=int, default=64, metavar="N", help="tensor size in MiB (default 64)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import trio

    if not 0 < args.size_mb <= 4096:
        raise CliError("--size-mb must be between 1 and 4096")
    say = (lambda *a: None) if args.json else print
    result = trio.run(_demo, args.size_mb << 20, say)
    if args.json:
        print_json(result)
    return 0 if result["bit_exact"] else 1


# ------------------------------------------------------------------ parent


class _Worker:
    """A worker process and a bounded reader of its JSON-line stdout."""

    def __init__(self, name: str, process: Any) -> None:
        self.name = name
        self.process = process
        self._buffer = bytearray()

    async def event(self, expected: str, timeout: float) -> dict[str, Any]:
        import trio

        with trio.move_on_after(timeout):
            while True:
                index = self._buffer.find(b"\n")
                if index >= 0:
                    line = bytes(self._buffer[:index])
                    del self._buffer[: index + 1]
                    message = json.loads(line)
                    if message.get("event") == "error":
                        raise GossamerError(f"node {self.name}: {message.get('message')}")
                    if message.get("event") == expected:
                        return message
                    continue
                if len(self._buffer) > MAX_LINE:
                    raise GossamerError(f"node {self.name} printed an overlong line")
                chunk = await self.process.stdout.receive_some(MAX_LINE)
                if not chunk:
                    code = await self.process.wait()
                    raise GossamerError(
                        f"node {self.name} exited (status {code}) before '{expected}'"
                    )
                self._buffer += chunk
        raise GossamerError(f"node {self.name}: no '{expected}' within {timeout:g} s")

    async def send_line(self, message: dict[str, Any]) -> None:
        await self.process.stdin.send_all(json.dumps(message).encode() + b"\n")

    async def stop(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the worker to exit, then kill it."""
        import trio

        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


async def _spawn(name: str, argv: list[str], workdir: Path) -> _Worker:
    import subprocess

    import trio

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gossamer.cli.demo_cmd", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=workdir,
    )
    return _Worker(name, process)


def _short(peer_id: str) -> str:
    return f"{peer_id[:8]}…{peer_id[-6:]}"


async def _demo(nbytes: int, say: Any) -> dict[str, Any]:
    import importlib.util

    import trio

    kind = "torch" if importlib.util.find_spec("torch") is not None else "bytes"
    started = time.perf_counter()
    workers: list[_Worker] = []
    with tempfile.TemporaryDirectory(prefix="gossamer-demo-") as tmp:
        root = Path(tmp)
        say(f"gossamer demo: two nodes on 127.0.0.1, data dirs under {root}")
        try:
            with trio.fail_after(DEMO_TIMEOUT_S):
                common = ["--nbytes", str(nbytes), "--kind", kind]
                a = await _spawn("A", ["recv", str(root / "a"), *common], root)
                workers.append(a)
                b = await _spawn("B", ["send", str(root / "b"), *common], root)
                workers.append(b)

                ready = await a.event("ready", WORKER_START_TIMEOUT_S)
                say(f"  node A  {_short(ready['peer_id'])}  listening on {ready['addr']}")
                await b.send_line({"addr": ready["addr"]})
                connected = await b.event("connected", WORKER_START_TIMEOUT_S)
                say(
                    f"  node B  {_short(connected['peer_id'])}  connected to A "
                    f"in {connected['connect_ms']:.0f} ms"
                )
                sent = await b.event("sent", DEMO_TIMEOUT_S)
                received = await a.event("received", DEMO_TIMEOUT_S)
                say(
                    f"  B → A   {sent['nbytes'] / 2**20:.1f} MiB {sent['what']} in "
                    f"{sent['seconds']:.3f} s = {sent['mb_per_s']:.0f} MB/s "
                    f"over the {sent['path']} path"
                )
                bit_exact = received["sha256"] == sent["sha256"] and (
                    received["nbytes"] == sent["nbytes"]
                )
                verdict = "matches B's: bit-exact" if bit_exact else "DIFFERS from B's"
                say(f"  node A  received sha256 {received['sha256'][:16]}… {verdict}")
                for worker in workers:  # both exit on their own once done
                    await worker.stop(grace=10.0)
        except trio.TooSlowError:
            raise GossamerError(f"the demo did not finish within {DEMO_TIMEOUT_S:g} s") from None
        finally:
            for worker in workers:  # after a failure: no waiting
                await worker.stop(grace=0)
    elapsed = time.perf_counter() - started
    say(f"done in {elapsed:.1f} s")
    return {
        "bit_exact": bit_exact,
        "nbytes": sent["nbytes"],
        "kind": kind,
        "seconds": sent["seconds"],
        "mb_per_s": sent["mb_per_s"],
        "path": sent["path"],
        "connect_ms": connected["connect_ms"],
        "sha256": sent["sha256"],
        "total_seconds": round(elapsed, 3),
    }


# ------------------------------------------------------------------ workers


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _node_config(data_dir: Path) -> Any:
    from gossamer.node.config import NodeConfig

    return NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        bootstrap=[],
        announce=[],
        mdns=False,
        log_level="warning",
    )


def _sha256(buffer: Any) -> str:
    import hashlib

    from gossamer.node.dataplane.tensors import describe

    _, view = describe("x", buffer)
    return hashlib.sha256(view).hexdigest()


def _make_payload(nbytes: int, kind: str) -> tuple[Any, str]:
    """A deterministic pseudo-random payload of ``nbytes`` and how to describe it."""
    if kind == "torch":
        import torch

        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(0)
        tensor = torch.randn(nbytes // 4, generator=generator, dtype=torch.float32)
        return tensor, f"torch.float32 tensor {list(tensor.shape)}"
    import random

    return bytearray(random.Random(0).randbytes(nbytes)), "bytes"


async def _run_receiver(data_dir: Path, nbytes: int, kind: str) -> None:
    import trio

    from gossamer.node.node import Node

    # The receiver prepares numpy memory (zero-copy target) whatever the sender
    # used: the data plane matches by dtype and shape, and this process never
    # pays for importing torch (seconds, on a small machine).
    into = None
    if kind == "torch":
        import numpy as np

        into = {"t": np.empty(nbytes // 4, dtype=np.float32)}
    async with Node(_node_config(data_dir)) as node:
        pending = node.dataplane.post_recv(None, TAG, into=into)
        addr = next(a for a in node.addrs() if a.startswith("/ip4/127.0.0.1/"))
        _emit("ready", peer_id=node.peer_id, addr=addr)
        received = await pending.wait(DEMO_TIMEOUT_S)
        digest = await trio.to_thread.run_sync(_sha256, received["t"])
        _emit(
            "received",
            sha256=digest,
            nbytes=received.nbytes,
            seconds=received.seconds,
            path=received.path,
            sender=received.peer_id,
        )


async def _run_sender(data_dir: Path, nbytes: int, kind: str) -> None:
    import trio

    from gossamer.node.node import Node

    payload, what = await trio.to_thread.run_sync(_make_payload, nbytes, kind)
    digest = await trio.to_thread.run_sync(_sha256, payload)
    async with Node(_node_config(data_dir)) as node:
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        addr = json.loads(line)["addr"]
        if not addr.startswith("/ip4/127.0.0.1/"):
            raise GossamerError(f"the demo only dials loopback addresses, not {addr}")
        start = time.perf_counter()
        peer_id = await node.connect(addr)
        _emit(
            "connected",
            peer_id=node.peer_id,
            remote=peer_id,
            connect_ms=(time.perf_counter() - start) * 1000,
        )
        report = await node.dataplane.send(peer_id, TAG, {"t": payload}, timeout=DEMO_TIMEOUT_S)
        _emit(
            "sent",
            sha256=digest,
            nbytes=report.nbytes,
            seconds=report.seconds,
            mb_per_s=report.mb_per_s,
            path=report.path,
            what=what,
        )


def _worker_main(argv: list[str]) -> int:
    import trio

    from gossamer.logs import setup_logging

    parser = argparse.ArgumentParser(prog="gossamer demo worker")
    parser.add_argument("role", choices=("recv", "send"))
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--kind", choices=("torch", "bytes"), required=True)
    args = parser.parse_args(argv)
    setup_logging("warning")
    run = _run_receiver if args.role == "recv" else _run_sender
    try:
        trio.run(run, args.data_dir, args.nbytes, args.kind)
    except Exception as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
