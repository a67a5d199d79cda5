"""The node the fuzz campaign attacks: ``python -m gossamer.bench._fuzz_target``.

A loopback node with every network-facing service a daemon runs: the DHT, a hosted run
document, state sync with one published state, an expert host (``ddm``) with one tiny expert,
the relay hop service, hole punching.  Prints one JSON line (address, peer id, run id, the
digest and expert cid it serves) and serves until stdin closes.  It logs to stderr at a
daemon's default level (info), so that the campaign can count the lines hostile input costs.
"""

from __future__ import annotations

import json
import sys
import threading

import trio


async def main() -> None:
    import torch

    from gossamer.bench._common import temp_node_config
    from gossamer.crdt import attach_stack
    from gossamer.logs import setup_logging
    from gossamer.node import Node
    from gossamer.training import StateService
    from gossamer.training.diffusion import ExpertSpec, expert_to_bytes, serving
    from gossamer.training.outer import init_outer_state
    from gossamer.training.statesync import anyone, make_snapshot

    torch.set_num_threads(1)
    setup_logging("info")
    config = temp_node_config(relay_service="on", log_level="info")
    async with Node(config) as node:
        crdt = await attach_stack(node, resume=False)
        assert crdt is not None
        run = await crdt.host_run("fuzz", config={"model": {"layers": 1}})
        params = {"w": torch.zeros(1000)}
        snapshot = make_snapshot(params, init_outer_state(params))
        # served to anyone, so that the fuzzer reaches past the membership check
        StateService.attach(node).publish(snapshot, allowed=anyone)
        spec = ExpertSpec("mlp", {"hidden": 16})
        expert = spec.build((1, 8, 8))
        blob = expert_to_bytes(expert, spec, (1, 8, 8))
        cid = serving.serve(node, max_batch=16).add_expert(blob, cluster=0).cid
        sys.stdout.write(
            json.dumps(
                {
                    "addr": node.addrs()[0],
                    "peer_id": node.peer_id,
                    "run_id": run.run_id,
                    "digest": snapshot.digest,
                    "cid": cid,
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        await trio.sleep_forever()


def _exit_when_stdin_closes() -> None:
    def watch() -> None:
        sys.stdin.read()
        import os

        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    _exit_when_stdin_closes()
    trio.run(main)
