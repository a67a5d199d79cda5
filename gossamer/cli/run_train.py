"""``gossamer run host`` and ``gossamer run join``: train the built-in model as a run's worker.

``gossamer run host --config run.toml`` publishes a run — its model, data recipe and DiLoCo
settings go into the run document's config, its id into the DHT — and trains as its first
worker. ``gossamer run join RUN_ID --bootstrap MULTIADDR`` joins it: the worker reads the
recipe from the run document, builds the same model, enters at the next round (downloading the
current state from the members) and trains until the run's last round. Both show progress bars
(loss, tokens/s, round, bytes sent, peers) and end with a summary; ``--json`` prints JSON lines
(``ready``, then ``result``) instead.

The worker is a node of its own, in the foreground (Ctrl-C stops it; a restarted worker resumes
from its checkpoint or downloads): identity and checkpoints under ``--data-dir`` (default
``<gossamer home>/worker``, apart from a daemon's identity). The run file's schema lives in
:mod:`gossamer.training.run_file`.

Torch is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gossamer.cli.common import CliError, add_json, print_json


def add_parsers(run_sub: Any) -> None:
    host = run_sub.add_parser(
        "host",
        help="publish a run (config in the run document, id in the DHT) and train in it",
    )
    host.add_argument(
        "--config", dest="run_config", metavar="RUN_TOML", required=True, help="the run file"
    )
    host.add_argument(
        "--access",
        choices=("open", "restricted"),
        help="open: anyone may join; restricted: only --allow peers and invite holders "
        "(default: open, or what the run's stored charter says)",
    )
    host.add_argument(
        "--allow",
        action="append",
        metavar="PEER_ID",
        help="a peer admitted to a restricted run (repeatable; see also `run invite`)",
    )
    host.add_argument(
        "--overlap",
        choices=("none", "streaming", "eager"),
        help="overlap the exchange with inner steps (default: the run file's [diloco] overlap, "
        "else none; see docs/diloco.md for choosing one)",
    )
    _add_worker_args(host)
    host.set_defaults(handler=cmd_host)

    join = run_sub.add_parser("join", help="join a run as a worker and train")
    join.add_argument("run_id", metavar="RUN_ID")
    join.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a member's address, ending in /p2p/<id> (repeatable; else the DHT is asked)",
    )
    join.add_argument(
        "--invite", metavar="TOKEN", help="an invite token from the run's creator (`run invite`)"
    )
    _add_worker_args(join)
    join.set_defaults(handler=cmd_join)


def _add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", help="this worker's identity and checkpoints")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/0)",
    )
    parser.add_argument(
        "--dataplane-listen", metavar="HOST:PORT", help="tensor data plane (default 0.0.0.0:0)"
    )
    parser.add_argument(
        "--announce", action="append", metavar="MULTIADDR", help="address to advertise"
    )
    parser.add_argument(
        "--shard", type=int, metavar="I", help="data shard (default: from this worker's peer id)"
    )
    parser.add_argument("--no-dht", action="store_true", help="do not start the DHT")
    add_json(parser)


# ------------------------------------------------------------------ commands


def _node_config(args: argparse.Namespace) -> Any:
    """Defaults < ``GOSSAMER_*`` environment < these flags (the run file is not a node config)."""
    from gossamer.node import default_data_dir, load_config

    listen = args.listen or ["/ip4/0.0.0.0/tcp/0"]
    return load_config(
        None,
        overrides={
            "data_dir": Path(args.data_dir) if args.data_dir else default_data_dir() / "worker",
            "listen": list(listen),
            "announce": list(args.announce or []),
            "dataplane_listen": args.dataplane_listen or "0.0.0.0:0",
            "log_level": "debug" if getattr(args, "verbose", 0) else "warning",
        },
    )


def cmd_host(args: argparse.Namespace) -> int:
    from gossamer.node import ConfigError
    from gossamer.training import load_run_file

    try:
        run_file = load_run_file(args.run_config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    from gossamer.crdt import CharterError
    from gossamer.node import public_key_from_peer_id

    for peer in args.allow or ():
        try:
            public_key_from_peer_id(peer)
        except ValueError:
            raise CliError(f"--allow {peer!r} is not a peer id") from None
    if args.allow and args.access == "open":
        raise CliError("--allow only matters with --access restricted")
    access = args.access or ("restricted" if args.allow else None)
    diloco = run_file.diloco
    if args.overlap is not None:
        import dataclasses

        try:
            diloco = dataclasses.replace(diloco, overlap=args.overlap)
        except ValueError as exc:
            raise CliError(f"--overlap {args.overlap}: {exc}") from None
    try:
        return _train(
            args,
            host=run_file.name,
            recipe=run_file.recipe,
            config=diloco,
            access=access,
            allow=args.allow,
        )
    except CharterError as exc:
        raise CliError(str(exc)) from None


def cmd_join(args: argparse.Namespace) -> int:
    from gossamer.crdt import CharterError, check_run_id

    try:
        check_run_id(args.run_id)
    except CharterError as exc:
        raise CliError(str(exc)) from None
    if not args.bootstrap and args.no_dht:
        raise CliError("give --bootstrap MULTIADDR (or let the DHT find the run)")
    from gossamer.crdt import Invite, InviteError, RunAccessError

    if args.invite is not None:
        try:
            if Invite.parse(args.invite).run_id != args.run_id:
                raise CliError(f"that invite is for another run, not {args.run_id}")
        except InviteError as exc:
            raise CliError(f"--invite: {exc}") from None
    try:
        return _train(args, run_id=args.run_id, bootstrap=args.bootstrap, invite=args.invite)
    except RunAccessError as exc:
        raise CliError(str(exc)) from None


def _train(args: argparse.Namespace, **how: Any) -> int:
    import trio

    view = _Progress(quiet=args.json)
    try:
        result, loss = trio.run(_run, args, view, how)
    except KeyboardInterrupt:
        view.stop()
        sys.stderr.write("stopped; run the same command again to resume\n")
        return 130
    finally:
        view.stop()
    from gossamer.training import result_summary

    summary = result_summary(result, loss)
    if args.json:
        print_json({"event": "result", **summary})
    else:
        view.summary(summary)
    return 0


async def _run(args: argparse.Namespace, view: _Progress, how: dict[str, Any]) -> Any:
    from gossamer.training import run_worker

    def ready(node: Any, run: Any, recipe: Any, config: Any) -> None:
        view.ready(node, run, recipe, config, as_json=args.json)

    return await run_worker(
        _node_config(args),
        shard=args.shard,
        on_ready=ready,
        on_event=view.event,
        use_dht=not args.no_dht,
        evaluate=True,
        control=True,  # `run invite|admit|revoke --data-dir` reach this worker
        **how,
    )


class _Progress:
    """Progress bars for a worker: round, loss, tokens/s, bytes sent, peers."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(highlight=False, stderr=quiet)
        self.progress: Any = None
        self.task: Any = None
        self.fields: dict[str, Any] = {"loss": "-", "tps": "-", "mb": "0.0", "peers": "-"}

    def ready(self, node: Any, run: Any, recipe: Any, config: Any, *, as_json: bool) -> None:
        addrs = node.addrs()
        if as_json:
            print_json(
                {"event": "ready", "run_id": run.run_id, "peer_id": node.peer_id, "addrs": addrs}
            )
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console.print(f"[bold]run[/bold] {run.run_id}  (this worker: {node.peer_id})")
        self.console.print(
            f"  model: GPT {recipe.n_layer} layers, d={recipe.d_model}, context {recipe.context}"
            f"; DiLoCo H={config.inner_steps}, codec {config.codec}, overlap {config.overlap}, "
            f"{config.rounds or '∞'} rounds"
        )
        if addrs:
            self.console.print(
                f"  others join with: gossamer run join {run.run_id} --bootstrap {addrs[0]}"
            )
        self.progress = Progress(
            TextColumn("  round {task.completed:.0f}/{task.fields[total_text]}"),
            BarColumn(bar_width=24),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mb]} MB sent"),
            TextColumn("{task.fields[peers]} peers"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "", total=config.rounds, total_text=config.rounds or "∞", **self.fields
        )
        self.progress.start()

    def event(self, event: dict[str, Any]) -> None:
        if self.quiet:
            if event.get("event") in ("round", "state", "refused"):
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
            return
        kind = event.get("event")
        if kind == "step":
            self.fields["loss"] = f"{event['loss']:.3f}"
            self.fields["tps"] = f"{event['tokens_per_s']:,.0f}"
        elif kind == "round":
            self.fields["mb"] = f"{event['bytes_sent_total'] / 1e6:,.1f}"
            self.fields["peers"] = str(event["members"] - 1)
            if self.progress is not None:
                self.progress.update(self.task, completed=event["round"] + 1)
        elif kind == "state" and self.progress is not None:
            self.progress.console.print(
                f"  state for round {event['round']} from {event['source']}"
            )
            if event["source"] != "fresh":
                self.progress.update(self.task, completed=event["round"])
        elif kind == "refused" and self.progress is not None:
            who, why = event["peer"][-10:], event["reason"]
            self.progress.console.print(f"  [yellow]refused[/yellow] {who}'s contribution: {why}")
        elif kind == "gather" and self.progress is not None:
            self.fields["peers"] = f"{event['members'] - 1} of {event['want'] - 1}"
        if self.progress is not None:
            self.progress.update(self.task, **self.fields)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, s: dict[str, Any]) -> None:
        ok, compared = s["parity_ok"], s["parity_compared"]
        self.console.print(
            f"done: round {s['final_round']}, eval loss {s['eval_loss']:.3f}"
            if s["eval_loss"] is not None
            else "done (no state)"
        )
        self.console.print(
            f"  {s['steps']:,} inner steps, {s['tokens']:,} tokens; sent "
            f"{s['bytes_sent_collective'] / 1e6:,.1f} MB in all-reduces, downloaded "
            f"{s['bytes_received_state'] / 1e6:,.1f} MB of state; parity {ok}/{compared} rounds"
        )
