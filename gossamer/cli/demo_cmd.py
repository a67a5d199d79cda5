"""``gossamer demo``: a local swarm trains a small model together, then meets its baseline.

Four worker processes (``python -m gossamer.training.worker``), each a gossamer node on
127.0.0.1 with one torch thread, form a DiLoCo run: the first hosts it (run document, round 0
once everyone is in), the others join through its address. They train the built-in byte-level
GPT on this Python's own standard-library sources — worker i on the i-th quarter of the train
files; 5% of the files, chosen by a hash of their names, are held out — taking H inner AdamW
steps each per round, then averaging their int8-compressed pseudo-gradients over the encrypted
data plane and applying the outer Nesterov step; after every round each checks that all four
hold bit-identical parameters.

Then, in this process, the baseline: synchronous data-parallel training (gradients averaged
every step) of the same model on exactly the same tokens (the same four shards, the same
batches, the same learning-rate schedule), from
:func:`gossamer.training.simulate.run_ddp`. It is *simulated* — one process computing what four
workers would, which gives the same numbers — and its bytes are what a ring all-reduce of fp32
gradients would send, not a measurement; the demo says so in its output.

The table at the end: held-out loss of both, and bytes each worker sent (DiLoCo: measured on
the wire; baseline: computed). Nothing leaves 127.0.0.1: the workers are built from an
explicit config (no TOML, no GOSSAMER_* settings, no DHT, no bootstrap list).
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
from gossamer.node import GossamerError

WORKER_START_TIMEOUT_S = 120.0  # interpreter + torch + libp2p imports on a busy 2-core box

# Defaults: about 5-7 minutes on a 2-core machine, baseline included (see --help).
DEFAULT_WORKERS = 4
DEFAULT_ROUNDS = 20
DEFAULT_H = 25
DEFAULT_CODEC = "int8"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="a local swarm of 4 workers trains a small GPT with DiLoCo (loopback only)",
        description=(
            "Worker processes on 127.0.0.1 train a byte-level GPT on this Python's standard "
            "library with DiLoCo, then a data-parallel baseline trains on the same tokens; "
            "the table compares eval loss and bytes sent. Defaults take about 5-8 minutes "
            "on 2 cores."
        ),
    )
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, metavar="N", help="worker processes (4)"
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, metavar="R", help="outer steps (20)"
    )
    parser.add_argument(
        "--inner-steps", type=int, default=DEFAULT_H, metavar="H", help="inner steps per round (25)"
    )
    parser.add_argument(
        "--codec",
        default=DEFAULT_CODEC,
        choices=("none", "fp16", "bf16", "int8", "int4"),
        help="pseudo-gradient compression (default int8)",
    )
    parser.add_argument(
        "--model",
        default="small",
        choices=("small", "tiny"),
        help="small: 4 layers, d=128, context 128 (0.84M params); tiny: for a quick look",
    )
    parser.add_argument(
        "--overlap",
        default="none",
        choices=("none", "streaming", "eager"),
        help="overlap the exchange with inner steps (default none; docs/diloco.md)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the DDP baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.set_defaults(handler=cmd_demo)


def _recipe(args: argparse.Namespace) -> Any:
    from gossamer.training import Recipe

    steps = args.rounds * args.inner_steps
    if args.model == "tiny":
        return Recipe(
            n_layer=1, n_head=2, d_model=32, context=32, schedule_steps=steps, shards=args.workers
        )
    return Recipe(schedule_steps=steps, shards=args.workers)


def cmd_demo(args: argparse.Namespace) -> int:
    import trio

    if not 2 <= args.workers <= 8:
        raise CliError("--workers must be between 2 and 8 (they all share this machine)")
    if args.rounds < 1 or args.inner_steps < 1:
        raise CliError("--rounds and --inner-steps must be at least 1")
    ui = _Ui(quiet=args.json)
    result = trio.run(_demo, args, ui)
    if args.json:
        print_json(result)
    else:
        ui.table(result)
    return 0 if result["bit_identical"] else 1


# ------------------------------------------------------------------------ output


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}" if n < 100e6 else f"{n / 1e6:,.0f}"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class _Ui:
    """Rich progress and the final table (nothing at all with --json)."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        # piped output is not cut to 80 columns (a log file of the demo stays readable)
        self.console = Console(
            highlight=False, stderr=quiet, width=None if sys.stdout.isatty() else 110
        )
        self.progress: Any = None
        self.task: Any = None

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def start_progress(self, total_rounds: int) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("  DiLoCo"),
            BarColumn(bar_width=28),
            TextColumn("round {task.completed:>3.0f}/{task.total:.0f}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mb]} MB sent/worker"),
            TextColumn("{task.fields[peers]} peers"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "", total=total_rounds, loss="-", tps="-", mb="0", peers="-"
        )
        self.progress.start()

    def update(self, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **fields)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, r: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="gossamer demo: same model, same tokens", title_justify="left")
        for header, justify in (
            ("method", "left"),
            ("eval loss", "right"),
            ("÷ DDP", "right"),
            ("MB sent per worker", "right"),
            ("wall time", "right"),
        ):
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
        d, b = r["diloco"], r.get("ddp")
        ratio = f"{d['eval_loss'] / b['eval_loss']:.3f}" if b else "-"
        table.add_row(
            f"DiLoCo, {r['workers']} processes over the network\n"
            f"  H={r['inner_steps']}, {r['rounds']} rounds, {r['codec']} pseudo-gradients",
            f"{d['eval_loss']:.3f}",
            ratio,
            f"{_mb(d['bytes_per_worker'])}\n  measured",
            _clock(d["seconds"]),
        )
        if b:
            table.add_row(
                "data-parallel baseline (simulated in one process)\n"
                "  fp32 gradients averaged every step",
                f"{b['eval_loss']:.3f}",
                "1.000",
                f"{_mb(b['bytes_per_worker'])}\n  computed: ring all-reduce",
                _clock(b["seconds"]),
            )
        table.add_row("untrained model", f"{r['eval_loss_init']:.3f}", "", "", "")
        self.console.print()
        self.console.print(table)
        tokens = r["tokens_per_worker"]
        lines = [
            f"  {r['workers']} workers × {tokens:,} tokens each (byte-level; {r['n_params']:,} "
            f"parameters); eval on {r['eval_files']} held-out stdlib files",
            f"  bit-identical after every round on all workers: "
            f"{'yes' if r['bit_identical'] else 'NO'} ({r['parity_rounds']} rounds checked)",
        ]
        if b:
            less = b["bytes_per_worker"] / max(1, d["bytes_per_worker"])
            worse = 100 * (d["eval_loss"] / b["eval_loss"] - 1)
            lines.append(
                f"  bytes: DiLoCo sent {less:,.0f}× less than the baseline would; "
                f"eval loss {worse:+.1f}% vs the baseline"
            )
        lines.append(f"  total wall time {_clock(r['total_seconds'])}")
        for line in lines:
            self.console.print(line)


# ------------------------------------------------------------------------ the swarm


async def _demo(args: argparse.Namespace, ui: _Ui) -> dict[str, Any]:
    import dataclasses

    import trio

    from gossamer.training import DiLoCoConfig, Recipe, WorkerProcess, spawn_worker

    started = time.perf_counter()
    recipe: Recipe = _recipe(args)
    config = DiLoCoConfig(
        inner_steps=args.inner_steps,
        rounds=args.rounds,
        codec=args.codec,
        min_workers=args.workers,
        join_timeout=120.0,
        overlap=args.overlap,
    )
    info = await trio.to_thread.run_sync(_corpus_info, recipe)
    ui.say(
        f"[bold]gossamer demo[/bold]: {args.workers} workers on 127.0.0.1 train a byte-level GPT "
        f"({info['n_params']:,} parameters) on this Python's standard library "
        f"({info['train_files']:,} files, {info['train_mb']:.0f} MB; {info['eval_files']} more "
        "held out for eval)"
    )
    ui.say(
        f"  DiLoCo: {args.rounds} rounds × {args.inner_steps} inner AdamW steps per worker, "
        f"{args.codec} pseudo-gradients with error feedback, outer Nesterov SGD (lr 0.7, "
        "momentum 0.9)"
    )
    n = args.workers
    workers: list[WorkerProcess] = []
    state: dict[str, Any] = {
        "loss": {},
        "tps": {},
        "mb": {},
        "peers": "-",
        "round": 0,
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="gossamer-demo-") as tmp:
        root = Path(tmp)
        try:
            common = ["--no-dht", "--exit-with-stdin", "--log-level", "error"]
            host_args = [
                "--data-dir",
                str(root / "w0"),
                "--host",
                "demo",
                "--recipe",
                json.dumps(dataclasses.asdict(recipe)),
                "--config",
                json.dumps(config.to_dict()),
                "--shard",
                "0",
                "--evaluate",
                *common,
            ]
            host = await spawn_worker(0, host_args, root)
            workers.append(host)
            host_events = host.events()
            with trio.fail_after(WORKER_START_TIMEOUT_S):
                ready = await _next_of(host_events, "ready")
            run_id, addr = ready["run_id"], ready["addrs"][0]
            ui.say(f"  run {run_id} hosted by worker 0 at {addr}")
            for i in range(1, n):
                argv = ["--data-dir", str(root / f"w{i}"), "--join", run_id, "--bootstrap", addr]
                workers.append(await spawn_worker(i, [*argv, "--shard", str(i), *common], root))
            train_start = time.perf_counter()
            ui.start_progress(args.rounds)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_follow, host, host_events, state, ui, n)
                for worker in workers[1:]:
                    nursery.start_soon(_follow, worker, worker.events(), state, ui, n)
            ui.stop_progress()
            diloco_seconds = time.perf_counter() - train_start
        except BaseException:
            ui.stop_progress()
            for worker in workers:
                await worker.stop(grace=0)
            raise
        for worker in workers:
            await worker.stop(grace=10.0)
    results = state["results"]
    if len(results) != n:
        raise GossamerError(f"only {len(results)} of {n} workers finished")
    final = {r["final_digest"] for r in results.values()}
    rounds_digests = [tuple(r["digests"]) for r in results.values()]
    bit_identical = (
        len(final) == 1
        and len(set(rounds_digests)) == 1
        and all(r["parity_ok"] == r["parity_compared"] for r in results.values())
    )
    ui.say(
        f"  all {n} workers done in {_clock(diloco_seconds)}: final state "
        f"{next(iter(final))[:16]}… on every worker"
        if len(final) == 1
        else f"  [red]workers disagree on the final state: {sorted(final)}[/red]"
    )
    tokens = results[0]["tokens"]
    diloco = {
        "eval_loss": results[0]["eval_loss"],
        "bytes_per_worker": sum(r["bytes_sent_collective"] for r in results.values()) / n,
        "bytes_per_worker_each": [results[i]["bytes_sent_collective"] for i in range(n)],
        "seconds": diloco_seconds,
    }
    ddp = None
    if not args.no_baseline:
        ddp = await _baseline(recipe, n, args.rounds * args.inner_steps, ui)
    return {
        "workers": n,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "codec": args.codec,
        "n_params": info["n_params"],
        "eval_files": info["eval_files"],
        "eval_loss_init": info["eval_loss_init"],
        "tokens_per_worker": tokens,
        "diloco": diloco,
        "ddp": ddp,
        "loss_ratio": None if ddp is None else diloco["eval_loss"] / ddp["eval_loss"],
        "bytes_reduction": None
        if ddp is None
        else ddp["bytes_per_worker"] / max(1.0, diloco["bytes_per_worker"]),
        "bit_identical": bit_identical,
        "parity_rounds": min(r["parity_compared"] for r in results.values()),
        "final_digest": next(iter(final)) if len(final) == 1 else None,
        "total_seconds": time.perf_counter() - started,
    }


async def _next_of(events: Any, kind: str) -> dict[str, Any]:
    async for event in events:
        if event.get("event") == kind:
            return event
    raise GossamerError(f"worker exited before '{kind}'")


async def _follow(worker: Any, events: Any, state: dict[str, Any], ui: _Ui, n: int) -> None:
    async for event in events:
        kind = event.get("event")
        i = worker.index
        if kind == "step":
            state["loss"][i] = event["loss"]
            state["tps"][i] = event["tokens_per_s"]
        elif kind == "round":
            state["mb"][i] = event["bytes_sent_total"]
            state["peers"] = str(event["members"] - 1)
            if i == 0:
                state["round"] = event["round"] + 1
        elif kind == "result":
            state["results"][i] = event
            continue
        else:
            continue
        losses = list(state["loss"].values())
        ui.update(
            completed=state["round"],
            loss=f"{sum(losses) / len(losses):.3f}" if losses else "-",
            tps=f"{sum(state['tps'].values()):,.0f}",
            mb=_mb(sum(state["mb"].values()) / n),
            peers=state["peers"],
        )
    if worker.index not in state["results"]:
        code = await worker.process.wait()
        raise GossamerError(f"worker {worker.index} exited (status {code}) before finishing")


def _corpus_info(recipe: Any) -> dict[str, Any]:
    import torch

    from gossamer.training import load_corpus

    torch.set_num_threads(1)
    corpus = load_corpus(recipe.corpus_root)
    model = recipe.model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return {
        "n_params": model.num_params(),
        "train_files": len(corpus.train_files),
        "eval_files": len(corpus.eval_files),
        "train_mb": corpus.train.numel() / 1e6,
        "eval_loss_init": recipe.eval_loss(params),
    }


async def _baseline(recipe: Any, n: int, steps: int, ui: _Ui) -> dict[str, Any]:
    import trio

    from gossamer.training import run_ddp

    ui.say(
        f"  baseline: synchronous data-parallel training on the same {n} shards and tokens, "
        f"{steps} steps — simulated in this process (the same arithmetic as {n} workers "
        "averaging fp32 gradients every step; its bytes are computed, not measured)"
    )
    start = time.perf_counter()
    if ui.quiet:
        out = await trio.to_thread.run_sync(run_ddp, recipe.sim_config(n_workers=n))
    else:
        with ui.console.status("  running the data-parallel baseline…"):
            out = await trio.to_thread.run_sync(run_ddp, recipe.sim_config(n_workers=n))
    return {
        "eval_loss": out["eval_loss"],
        "bytes_per_worker": out["bytes_per_worker"],
        "seconds": time.perf_counter() - start,
        "collective": out["collective"],
    }
