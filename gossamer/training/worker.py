"""A worker of the built-in recipe: host or join a run and train, in this process or as a child.

:func:`run_worker` is what ``gossamer run host`` / ``gossamer run join`` call in-process. Run as
``python -m gossamer.training.worker …`` it is the child process that ``gossamer demo``, the
benchmarks and the multi-process tests start: it prints one JSON object per line on stdout
(``{"event": "ready", …}`` with its peer id, addresses and run id, then the worker's progress
events, then ``{"event": "result", …}``) and exits when the run's rounds are done, when its stdin
closes (``--exit-with-stdin``), or on SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from gossamer.node import GossamerError, NodeConfig, load_config
from gossamer.training.diloco import DiLoCoWorker
from gossamer.training.diloco_config import DiLoCoConfig
from gossamer.training.diloco_results import TrainResult
from gossamer.training.recipe import Recipe
from gossamer.training.sdk import open_run, run_config_of

__all__ = ["WorkerProcess", "result_summary", "run_worker", "spawn_worker"]

CONFIG_WAIT_S = 30.0
MAX_LINE = 1 << 20  # of a child's JSON events


def _shard_of(peer_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big") % shards


async def _recipe_and_config(run: Any) -> tuple[Recipe, DiLoCoConfig]:
    with trio.move_on_after(CONFIG_WAIT_S):
        while True:
            config = run.doc.config()
            dcfg = run_config_of(run.doc)
            if dcfg is not None and config.model is not None and config.data is not None:
                return Recipe.from_config(config.model, config.data), dcfg
            await trio.sleep(0.1)
    raise GossamerError(f"run {run.run_id} has no model/data/DiLoCo settings in its document")


async def run_worker(
    node_config: NodeConfig,
    *,
    host: str | None = None,
    run_id: str | None = None,
    bootstrap: Sequence[str] = (),
    recipe: Recipe | None = None,
    config: DiLoCoConfig | None = None,
    shard: int | None = None,
    on_ready: Callable[[Any, Any, Recipe, DiLoCoConfig], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    hooks: Mapping[str, Callable[..., Any]] | None = None,
    use_dht: bool = True,
    evaluate: bool = False,
    access: str | None = None,
    allow: Sequence[str] | None = None,
    invite: str | None = None,
    control: bool = False,
) -> tuple[TrainResult, float | None]:
    """Host (``host`` = run name, with ``recipe`` and ``config``) or join (``run_id``) a run of
    the built-in recipe and train; returns the result and, with ``evaluate``, the eval loss.

    ``access``/``allow`` (hosting) and ``invite`` (joining): see :mod:`gossamer.crdt.invite`.
    ``control``: serve the node's control API in its data dir while training (the CLI's
    foreground worker, so that ``gossamer run admit|revoke|invite`` reach it)."""
    from gossamer.node import Node
    from gossamer.training.memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    async with Node(node_config) as node, trio.open_nursery() as services:
        if control:
            from gossamer.node.control import ControlServer

            server = ControlServer(
                node.control_methods, node_config.data_dir, peer_id=node.peer_id, port=0
            )
            await services.start(server.run)
        if host is not None:
            recipe = recipe or Recipe()
            config = config or DiLoCoConfig()
            run_config = {**recipe.to_config(), "hparams": {"diloco": config.to_dict()}}
            run = await open_run(
                node,
                host=host,
                run_config=run_config,
                use_dht=use_dht,
                access=access,
                allow=allow,
            )
        else:
            run = await open_run(
                node, run_id=run_id, bootstrap=bootstrap, use_dht=use_dht, invite=invite
            )
            recipe, config = await _recipe_and_config(run)
        assert recipe is not None and config is not None
        if shard is None:
            shard = _shard_of(node.peer_id, recipe.shards)
        inner = await trio.to_thread.run_sync(recipe.inner_loop, shard)
        if on_ready is not None:
            on_ready(node, run, recipe, config)
        worker = DiLoCoWorker(
            node, run, inner, config, on_event=on_event, should_stop=should_stop, hooks=hooks
        )
        result = await worker.train()
        loss = None
        if evaluate and result.state is not None:
            loss = await trio.to_thread.run_sync(recipe.eval_loss, result.state.params)
        services.cancel_scope.cancel()  # only the control server lives there
        return result, loss


def result_summary(result: TrainResult, eval_loss: float | None = None) -> dict[str, Any]:
    ok, compared = result.parity_rounds
    return {
        "peer_id": result.peer_id,
        "run_id": result.run_id,
        "rounds": [r.round for r in result.records],
        "digests": [r.digest for r in result.records],
        "final_digest": result.final_digest,
        "final_round": None if result.state is None else result.state.round,
        "parity_ok": ok,
        "parity_compared": compared,
        "entered_by": result.entered_by,
        "refetches": result.refetches,
        "bytes_sent_collective": result.bytes_sent_collective,
        "bytes_received_state": result.bytes_received_state,
        "tokens": sum(r.tokens for r in result.records),
        "steps": sum(r.steps for r in result.records),
        # where a round's time went: inner steps vs. the all-reduce, outer step and parity
        "seconds_inner": sum(r.seconds_inner for r in result.records),
        "seconds_sync": sum(r.seconds_sync for r in result.records),
        # per round, in round order: [inner, sync] seconds (the first and last rounds of an
        # overlapped run differ from the rest: nothing to wait for yet, every exchange to wait for)
        "round_seconds": [
            [round(r.seconds_inner, 3), round(r.seconds_sync, 3)]
            for r in sorted(result.records, key=lambda r: r.round)
        ],
        "eval_loss": eval_loss,
    }


# ----------------------------------------------------------------- the parent's side


class WorkerProcess:
    """A worker process and a bounded reader of its JSON-line stdout."""

    def __init__(self, index: int, process: Any) -> None:
        self.index = index
        self.process = process
        self._buffer = bytearray()

    async def events(self) -> Any:
        """Yield the worker's events until it exits."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                if line.startswith(b"{"):
                    event = json.loads(line)
                    if event.get("event") == "error":
                        raise GossamerError(f"worker {self.index}: {event.get('message')}")
                    yield event
                continue
            if len(self._buffer) > MAX_LINE:
                raise GossamerError(f"worker {self.index} printed an overlong line")
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                return
            self._buffer += chunk

    async def stop(self, grace: float) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


async def spawn_worker(
    index: int, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None
) -> WorkerProcess:
    """Start ``python -m gossamer.training.worker *argv`` in ``workdir``; ``GOSSAMER_*`` of this
    process's environment are not passed on (``env`` adds variables)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    child_env["OMP_NUM_THREADS"] = "1"
    child_env.update(env or {})
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gossamer.training.worker", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=workdir,
        env=child_env,
    )
    return WorkerProcess(index, process)


# ------------------------------------------------------------------------ child process


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    from gossamer.logs import setup_logging

    ap = argparse.ArgumentParser(prog="python -m gossamer.training.worker")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--host", metavar="NAME", help="start this run (with --recipe/--config)")
    ap.add_argument("--join", metavar="RUN_ID", help="join this run")
    ap.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR")
    ap.add_argument("--recipe", default="{}", help="JSON: Recipe fields (host only)")
    ap.add_argument("--config", default="{}", help="JSON: DiLoCoConfig fields (host only)")
    ap.add_argument("--shard", type=int)
    ap.add_argument("--evaluate", action="store_true", help="eval loss of the final state")
    ap.add_argument("--exit-with-stdin", action="store_true")
    ap.add_argument("--no-dht", action="store_true")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument(
        "--shape",
        default="",
        help="this node's link (node/shaper.py), e.g. up_mbit=100,latency_ms=50",
    )
    # tests: stall inside the all-reduce of this round (announced with a "stalling" event)
    ap.add_argument("--stall-round", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    if (args.host is None) == (args.join is None):
        ap.error("give exactly one of --host NAME and --join RUN_ID")
    if args.exit_with_stdin:

        def watch() -> None:
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node_config = load_config(
        None,
        overrides={
            "data_dir": args.data_dir,
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "dataplane_listen": "127.0.0.1:0",
            "mdns": False,
            "log_level": args.log_level,
            "shape": args.shape or None,
        },
    )
    hooks: dict[str, Any] = {}
    if args.stall_round is not None:

        async def on_attempt(r: int, attempt: int, members: list[str]) -> None:
            if r == args.stall_round and attempt == 0:
                _emit("stalling", round=r, members=members)
                await trio.sleep(3600)

        hooks["on_attempt"] = on_attempt

    nodes: list[Any] = []

    def ready(node: Any, run: Any, recipe: Recipe, config: DiLoCoConfig) -> None:
        nodes.append(node)
        _emit(
            "ready",
            peer_id=node.peer_id,
            addrs=node.addrs(),
            run_id=run.run_id,
            n_params=recipe.model().num_params(),
        )

    try:
        result, loss = trio.run(
            lambda: run_worker(
                node_config,
                host=args.host,
                run_id=args.join,
                bootstrap=args.bootstrap,
                recipe=Recipe(**json.loads(args.recipe)),
                config=DiLoCoConfig.from_dict(json.loads(args.config)),
                shard=args.shard,
                on_ready=ready,
                on_event=lambda e: _emit(e.pop("event"), **e),
                should_stop=stop.is_set,
                hooks=hooks,
                use_dht=not args.no_dht,
                evaluate=args.evaluate,
            )
        )
    except Exception as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        raise
    link = nodes[0].shaper.stats() if nodes and nodes[0].shaper.active else None
    _emit("result", **result_summary(result, loss), link=link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
