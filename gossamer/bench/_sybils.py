"""Fake members of a run, in a process of their own: ``python -m gossamer.bench._sybils``.

``--run RUN --bootstrap MULTIADDR --count N``: N loopback nodes join the run and each, until
stdin closes, announces itself for the round the others are in and heartbeats, never
contributing (:func:`gossamer.bench.adversary.sybil`). Prints one JSON line ``{"peers": [...]}``
when they have joined. Apart from the bench's own process, as strangers' machines are: ten more
nodes on the members' event loop made every data-plane handshake of that loop time out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import trio


async def _main(args: argparse.Namespace) -> None:
    from gossamer.bench.adversary import sybil
    from gossamer.crdt import CrdtService, SyncOptions, open_stack
    from gossamer.node import NodeConfig

    stop = trio.Event()
    with tempfile.TemporaryDirectory(prefix="gossamer-sybils-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            runs = []
            for i in range(args.count):
                config = NodeConfig(
                    data_dir=Path(tmp) / f"s{i}",
                    listen=["/ip4/127.0.0.1/tcp/0"],
                    dataplane_listen="127.0.0.1:0",
                    log_level="error",
                )
                node = await stack.enter_async_context(
                    open_stack(config, dht=False, options=SyncOptions(heartbeat_interval=2.0))
                )
                service = node.service(CrdtService)
                runs.append(await service.join_run(args.run, bootstrap=[args.bootstrap]))
            sys.stdout.write(json.dumps({"peers": [r.node.peer_id for r in runs]}) + "\n")
            sys.stdout.flush()
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(sybil, run, stop)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gossamer.bench._sybils")
    parser.add_argument("--run", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()

    def watch() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    trio.run(_main, args)


if __name__ == "__main__":
    main()
