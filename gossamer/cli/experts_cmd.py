"""``gossamer experts …`` and ``gossamer generate``: decentralized diffusion from the shell.

A run, start to finish, on four machines and a laptop::

    gossamer experts host digits --k 4 --steps 20000          # prints the run id and address
    gossamer experts train RUN --cluster 0 --bootstrap ADDR --out e0.safetensors --serve
    …                                                          # clusters 1–3 on other nodes
    gossamer experts list RUN --bootstrap ADDR
    gossamer generate RUN --bootstrap ADDR --n 64 --mode top2 --out grid.png

``host`` fits the partition, publishes it in the run document, trains the router (≤ 5% of the
experts' FLOPs) and serves it. ``train`` reads the plan, *closes its node*, trains one cluster's
expert with no network, writes the checkpoint and (``--serve``) serves it. ``serve`` serves
checkpoints already on disk. The long-running ones stop cleanly on Ctrl-C / SIGTERM and print a
ready line first (``--json``: one JSON object). ``list`` and ``generate`` start a short-lived node
with a fresh identity (unless ``--data-dir`` is given) and follow the run without joining it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gossamer.cli.common import (
    CliError,
    add_json,
    add_node_args,
    add_verbose,
    load_node_config,
    print_json,
    print_rows_table,
)

MODES_HELP = "top1, top2 (any topK), full, or sticky (one expert per image, drawn at t=0)"


def register(subparsers: Any) -> None:
    experts = subparsers.add_parser("experts", help="decentralized diffusion experts")
    sub = experts.add_subparsers(dest="experts_command", metavar="SUBCOMMAND", required=True)

    host = sub.add_parser("host", help="create a diffusion run: partition, router, bootstrap")
    host.add_argument("name", metavar="NAME", help="run name (lowercase letters, digits, _ .)")
    host.add_argument("--k", type=int, default=4, help="clusters = experts (default 4)")
    host.add_argument("--steps", type=int, default=5000, help="experts' total training steps")
    host.add_argument("--batch", type=int, default=128)
    host.add_argument("--lr", type=float, default=1e-3)
    host.add_argument("--expert", default="mlp", help="registered expert architecture")
    host.add_argument("--expert-kwargs", default="{}", metavar="JSON")
    host.add_argument("--data", metavar="FOLDER", help="image folder (default: sklearn digits)")
    host.add_argument("--size", type=int, default=32, help="image size for --data")
    host.add_argument("--grey", action="store_true", help="read --data as grey (default RGB)")
    host.add_argument("--router-steps", type=int, help="override the 5%% router budget")
    host.add_argument("--temperature", type=float, default=0.5, help="router temperature")
    host.add_argument("--seed", type=int, default=0)
    _long_running(host)
    host.set_defaults(handler=cmd_host)

    train = sub.add_parser("train", help="train one cluster's expert in isolation")
    train.add_argument("run", metavar="RUN_ID")
    train.add_argument("--cluster", type=int, required=True)
    train.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write")
    train.add_argument("--data", metavar="FOLDER", help="this node's copy of the run's folder")
    train.add_argument("--steps", type=int, help="override the plan's step count")
    train.add_argument("--serve", action="store_true", help="serve the checkpoint afterwards")
    _long_running(train)
    train.set_defaults(handler=cmd_train)

    serve = sub.add_parser("serve", help="serve expert checkpoints to the network")
    serve.add_argument(
        "--checkpoint", action="append", required=True, metavar="FILE", help="(repeatable)"
    )
    serve.add_argument("--run", metavar="RUN_ID", help="announce in this run's document")
    serve.add_argument("--cluster", type=int, help="cluster id (default: the file's metadata)")
    serve.add_argument("--router", metavar="FILE", help="also serve these router weights")
    _long_running(serve)
    serve.set_defaults(handler=cmd_serve)

    listing = sub.add_parser("list", help="experts a run announces (and their hosts)")
    listing.add_argument("run", metavar="RUN_ID")
    listing.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the run")
    _client(listing)
    listing.set_defaults(handler=cmd_list)

    gen = subparsers.add_parser("generate", help="sample images from a run's experts")
    gen.add_argument("run", metavar="RUN_ID")
    gen.add_argument("--n", type=int, default=64, help="number of images")
    gen.add_argument("--mode", default="top2", help=MODES_HELP)
    gen.add_argument("--out", default="grid.png", metavar="FILE", help="PNG grid to write")
    gen.add_argument("--steps", type=int, help="Euler steps (default: the run's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--temperature", type=float, help="router temperature (default: the run's; 1 for sticky)"
    )
    gen.add_argument("--router", metavar="FILE", help="router weights to use instead of the run's")
    gen.add_argument(
        "--verify",
        default="challenge",
        choices=("challenge", "hash", "none"),
        help="how announcements are checked before use (default: hash + challenge)",
    )
    gen.add_argument("--wait", type=float, default=10.0, help="seconds to wait for experts")
    _client(gen)
    gen.set_defaults(handler=cmd_generate)


def _add_plugin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import this module first: it registers your expert architecture (repeatable)",
    )


def _load_plugins(args: argparse.Namespace) -> None:
    import importlib
    import os

    if os.getcwd() not in sys.path:  # as `python -m` would: a module next to the user's files
        sys.path.insert(0, os.getcwd())
    for name in getattr(args, "plugin", None) or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CliError(f"cannot import plugin {name!r}: {exc}") from None


def _long_running(parser: argparse.ArgumentParser) -> None:
    _add_plugin(parser)
    add_node_args(parser)
    add_json(parser)
    add_verbose(parser)


def _client(parser: argparse.ArgumentParser) -> None:
    _add_plugin(parser)
    parser.add_argument(
        "--bootstrap", action="append", metavar="MULTIADDR", help="a peer of the run (repeatable)"
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--data-dir", metavar="DIR", help="node data dir (default: a fresh one)")
    add_json(parser)
    add_verbose(parser)


# --------------------------------------------------------------------------------- helpers


def _check_run_id(run_id: str) -> str:
    from gossamer.crdt import CharterError, check_run_id

    try:
        return check_run_id(run_id)
    except CharterError as exc:
        raise CliError(str(exc)) from None


def _check_mode(mode: str) -> None:
    import re

    if not re.fullmatch(r"top[1-9][0-9]*|full|sticky", mode):
        raise CliError(f"unknown mode {mode!r}: use {MODES_HELP}")


def _client_config(args: argparse.Namespace) -> Any:
    if getattr(args, "data_dir", None) is None:
        args.data_dir = tempfile.mkdtemp(prefix="gossamer-client-")
    config = load_node_config(args)
    return config.replace(listen=["/ip4/127.0.0.1/tcp/0"], dataplane_listen="127.0.0.1:0")


def _quiet_libp2p(args: argparse.Namespace) -> None:
    """A short-lived client dials peers the swarm remembers and finds some gone; py-libp2p logs
    each failed dial as an error. Those lines are noise to a user (``-vv`` shows them)."""
    import logging

    if getattr(args, "verbose", 0) < 2:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _ready_printer(args: argparse.Namespace, info: dict[str, Any]) -> Any:
    def ready(node: Any, server: Any) -> None:
        payload = {"peer_id": node.peer_id, "addrs": node.addrs(), **info}
        if args.json:
            sys.stdout.write(json.dumps(payload, sort_keys=True) + "\n")
        else:
            lines = [f"ready: {node.peer_id} on {' '.join(node.addrs())}"]
            lines += [f"  {k}: {v}" for k, v in info.items() if not isinstance(v, dict | list)]
            sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    return ready


def _run_daemon(args: argparse.Namespace, config: Any, attach: Any, info: dict[str, Any]) -> int:
    from gossamer.node import daemon

    daemon.run(config, extensions=[attach], ready=_ready_printer(args, info))
    return 0


# --------------------------------------------------------------------------------- commands


def cmd_host(args: argparse.Namespace) -> int:
    _load_plugins(args)
    config = load_node_config(args)
    spec_kwargs = _json_arg(args.expert_kwargs, "--expert-kwargs")
    import torch

    torch.set_num_threads(1)
    from gossamer.training.diffusion import ExpertSpec, registered_experts, workflow

    if args.expert not in registered_experts():
        raise CliError(f"unknown expert {args.expert!r} (registered: {registered_experts()})")
    spec = workflow.data_spec(args.data, args.size, args.grey)
    try:
        data = workflow.load_data(spec, args.data)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(f"cannot load the data: {exc}") from None
    if not 1 <= args.k <= len(data):
        raise CliError(f"--k must be in 1..{len(data)}")
    if args.steps < args.k or args.batch < 1:
        raise CliError("--steps must be at least --k, and --batch positive")
    try:
        ExpertSpec(args.expert, spec_kwargs).build(data.image_shape)
    except Exception as exc:  # a user's factory can raise anything on bad kwargs
        raise CliError(f"cannot build expert {args.expert!r} with {spec_kwargs}: {exc}") from None
    plan = workflow.plan_run(
        data,
        spec,
        k=args.k,
        total_steps=args.steps,
        expert=ExpertSpec(args.expert, spec_kwargs),
        seed=args.seed,
        batch=args.batch,
        lr=args.lr,
        temperature=args.temperature,
    )
    _router, router_bytes, router_info = workflow.train_run_router(
        plan, data, steps=args.router_steps
    )
    info: dict[str, Any] = {
        "partition": plan.partition,
        "k": plan.k,
        "router_steps": router_info["steps"],
        "router_flops_fraction": round(router_info["fraction"], 4),
    }

    async def attach(node: Any) -> None:
        from gossamer.crdt import attach_stack

        await attach_stack(node)
        run = await workflow.host_run(node, args.name, plan, router=router_bytes)
        info["run_id"] = run.run_id

    return _run_daemon(args, config, attach, info)


def cmd_train(args: argparse.Namespace) -> int:
    _load_plugins(args)
    run_id = _check_run_id(args.run)
    config = load_node_config(args)
    import torch

    torch.set_num_threads(1)
    from gossamer.training.diffusion import workflow

    try:
        plan = _trio_run(lambda: workflow.fetch_plan(config, run_id, list(config.bootstrap)))
        if not 0 <= args.cluster < plan.k:
            raise CliError(f"--cluster must be in 0..{plan.k - 1}")
        data = workflow.load_data(plan.data, args.data)
        # the node is closed: from here to the checkpoint, no communication at all
        started = time.perf_counter()
        _, blob = workflow.train_cluster_expert(
            plan, data, args.cluster, run_id=run_id, steps=args.steps
        )
        train_s = time.perf_counter() - started
    except workflow.PlanError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    from gossamer.training.diffusion import content_id

    info = {
        "run_id": run_id,
        "cluster": args.cluster,
        "cid": content_id(blob),
        "out": str(out),
        "steps": plan.expert_steps[args.cluster] if args.steps is None else args.steps,
        "train_s": round(train_s, 3),
    }
    if not args.serve:
        if args.json:
            print_json(info)
        else:
            print(f"cluster {args.cluster}: wrote {out} (cid {info['cid'][:16]}…)")
        return 0
    return _serve(args, config, [blob], run_id, None, None, info)


def cmd_serve(args: argparse.Namespace) -> int:
    _load_plugins(args)
    run_id = _check_run_id(args.run) if args.run else None
    config = load_node_config(args)
    blobs = [_read(p, "checkpoint") for p in args.checkpoint]
    router = _read(args.router, "router") if args.router else None
    import torch

    torch.set_num_threads(1)
    from gossamer.training.diffusion import checkpoint_meta, content_id, expert_from_bytes

    for path, blob in zip(args.checkpoint, blobs, strict=True):
        try:
            expert_from_bytes(blob)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CliError(f"{path} is not an expert checkpoint: {exc}") from None
        if args.cluster is None and not isinstance(checkpoint_meta(blob).get("cluster"), int):
            raise CliError(f"{path} does not say its cluster: pass --cluster")
    info = {"run_id": run_id, "cids": [content_id(b) for b in blobs]}
    return _serve(args, config, blobs, run_id, args.cluster, router, info)


def _serve(
    args: argparse.Namespace,
    config: Any,
    blobs: list[bytes],
    run_id: str | None,
    cluster: int | None,
    router: bytes | None,
    info: dict[str, Any],
) -> int:
    from gossamer.training.diffusion import workflow

    async def attach(node: Any) -> None:
        from gossamer.crdt import attach_stack

        await attach_stack(node, crdt=run_id is not None)
        run = None
        if run_id is not None:
            run = await workflow.join(node, run_id, list(config.bootstrap))
        await workflow.serve_checkpoints(
            node, blobs, run=run, run_id=run_id, cluster=cluster, router=router
        )

    return _run_daemon(args, config, attach, info)


def cmd_list(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run)
    config = _client_config(args)

    from gossamer.crdt import open_stack
    from gossamer.training.diffusion import discover, workflow

    async def main() -> dict[str, Any]:
        async with open_stack(config) as node:
            _quiet_libp2p(args)
            run = await workflow.join(node, run_id, list(config.bootstrap), member=False)
            plan = None
            with contextlib.suppress(workflow.PlanError):
                plan = await workflow.wait_plan(run, args.wait)
            if plan is not None:
                with contextlib.suppress(workflow.PlanError):
                    await workflow.wait_experts(run, plan.k, args.wait)
            found = await discover(
                node,
                run_id,
                run=run,
                partition=plan.partition if plan else None,
                k=plan.k if plan else None,
            )
            return {
                "run_id": run_id,
                "k": plan.k if plan else None,
                "partition": plan.partition if plan else None,
                "experts": [found.experts[c].to_dict() for c in sorted(found.experts)],
                "router": found.router.to_dict() if found.router else None,
                "all": [r.to_dict() for r in found.candidates],
            }

    result = _trio_run(main)
    if args.json:
        print_json(result)
        return 0
    rows = [
        {
            "cluster": "router" if r["kind"] == "router" else r["cluster"],
            "cid": r["cid"][:16] + "…",
            "hosts": [h[-12:] for h in r["hosts"]],
            "spec": (r.get("spec") or {}).get("name", "-"),
            "bytes": r["nbytes"],
        }
        for r in result["experts"] + ([result["router"]] if result["router"] else [])
    ]
    print_rows_table(
        f"run {run_id}: {len(result['experts'])} of {result['k'] or '?'} clusters served",
        [
            ("cluster", "cluster"),
            ("cid", "cid"),
            ("hosts", "hosts"),
            ("spec", "spec"),
            ("bytes", "bytes"),
        ],
        rows,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _load_plugins(args)
    run_id = _check_run_id(args.run)
    _check_mode(args.mode)
    if not 1 <= args.n <= 100_000:
        raise CliError("--n must be in 1..100000")
    if args.steps is not None and not 1 <= args.steps <= 10_000:
        raise CliError("--steps must be in 1..10000")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must name a .png file, got {out}")
    router_bytes = _read(args.router, "router") if args.router else None
    config = _client_config(args)
    import torch

    torch.set_num_threads(1)
    from gossamer.training.diffusion import router_from_bytes, save_image_grid, workflow

    router = None
    if router_bytes is not None:
        try:
            router = router_from_bytes(router_bytes)
        except (ValueError, RuntimeError) as exc:
            raise CliError(f"{args.router} is not router weights: {exc}") from None

    from gossamer.crdt import open_stack

    async def main() -> workflow.Generation:
        async with open_stack(config) as node:
            _quiet_libp2p(args)
            run = await workflow.join(node, run_id, list(config.bootstrap), member=False)
            return await workflow.generate(
                node,
                run,
                args.n,
                mode=args.mode,
                seed=args.seed,
                steps=args.steps,
                temperature=args.temperature,
                router=router,
                verify=args.verify,
                cache_dir=Path(config.data_dir) / "ddm-cache",
                wait=args.wait,
            )

    result = _trio_run(main)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(result.images[: args.n], out, nrow=min(16, max(1, int(args.n**0.5 + 0.5))))
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    summary = {
        "out": str(out),
        "n": args.n,
        "mode": args.mode,
        "seconds": round(result.seconds, 3),
        "missing_clusters": result.missing,
        "refused_hosts": result.refused,
        "experts": {str(c): s for c, s in result.experts.items()},
    }
    if args.json:
        print_json(summary)
    else:
        served = {c: sum(h["rows"] for h in s["hosts"]) for c, s in result.experts.items()}
        print(
            f"wrote {out}: {args.n} images, mode {args.mode}, {result.seconds:.2f} s; "
            f"rows per expert {served}"
            + (f"; missing clusters {result.missing}" if result.missing else "")
            + (f"; refused {len(result.refused)} announcement(s)" if result.refused else "")
        )
    return 0


def _trio_run(main: Any) -> Any:
    """``trio.run(main)`` with a plan problem (wherever it was raised) as one CLI line."""
    import trio

    from gossamer.training.diffusion import PlanError

    try:
        return trio.run(main)
    except (PlanError, BaseExceptionGroup) as exc:
        found = _find(exc, PlanError)
        if found is None:
            raise
        raise CliError(str(found)) from None


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _json_arg(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object")
    return value
