"""``gossamer node …`` and ``gossamer peers``: run a daemon and talk to it.

Everything except ``node start``, ``node id`` and ``node config`` goes
through the running daemon's control API (:mod:`gossamer.node.control`), so
these commands start in a fraction of a second: they never import libp2p.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from gossamer.cli.common import (
    CliError,
    add_json,
    add_location_args,
    add_node_args,
    add_verbose,
    control_call,
    load_node_config,
    print_json,
    print_kv_table,
    print_rows_table,
)

# "module:function" coroutines ``async def attach(node)`` that upper layers
# (dht, crdt, training) add to every daemon: they register their services and
# control methods on the started node.  Imported only by ``node start``.
DAEMON_EXTENSIONS: tuple[str, ...] = ("gossamer.dht:attach", "gossamer.crdt.sync:attach")


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="run a node daemon and inspect it")
    node_sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)

    start = node_sub.add_parser("start", help="run a node in the foreground until Ctrl-C")
    add_node_args(start)
    add_verbose(start)
    start.set_defaults(handler=cmd_start)

    status = node_sub.add_parser("status", help="status of the running daemon")
    add_location_args(status)
    add_json(status)
    status.set_defaults(handler=cmd_status)

    ident = node_sub.add_parser("id", help="this node's peer id and addresses")
    add_location_args(ident)
    add_json(ident)
    ident.set_defaults(handler=cmd_id)

    connect = node_sub.add_parser("connect", help="ask the daemon to connect to a peer")
    connect.add_argument("addr", metavar="MULTIADDR", help="peer address ending in /p2p/<id>")
    add_location_args(connect)
    add_json(connect)
    connect.set_defaults(handler=cmd_connect)

    ping = node_sub.add_parser("ping", help="round trip from the daemon to a peer")
    ping.add_argument("peer_id", metavar="PEER_ID")
    add_location_args(ping)
    add_json(ping)
    ping.set_defaults(handler=cmd_ping)

    config = node_sub.add_parser(
        "config", help="print the effective config (defaults < TOML < env < flags)"
    )
    add_node_args(config)
    add_json(config)
    config.set_defaults(handler=cmd_config)

    peers = subparsers.add_parser("peers", help="peers the running daemon knows")
    add_location_args(peers)
    add_json(peers)
    peers.set_defaults(handler=cmd_peers)


# ------------------------------------------------------------------ start


def _load_extensions() -> list[Any]:
    extensions = []
    for spec in DAEMON_EXTENSIONS:
        module_name, _, attr = spec.partition(":")
        extensions.append(getattr(importlib.import_module(module_name), attr))
    return extensions


def cmd_start(args: argparse.Namespace) -> int:
    from gossamer.logs import setup_logging

    config = load_node_config(args)  # config mistakes surface before the slow imports
    from gossamer.dht import DHTConfig

    DHTConfig.from_table(config.tables.get("dht", {}))  # the daemon's DHT reads it again
    verbose = getattr(args, "verbose", 0)
    setup_logging(config.log_level, libp2p_level="debug" if verbose >= 2 else None)

    from gossamer.node import daemon

    def ready(node: Any, server: Any) -> None:
        addrs = " ".join(node.addrs()) or "(no addresses)"
        print(
            f"ready: {node.peer_id} listening on {addrs} "
            f"(control 127.0.0.1:{server.port}, data dir {config.data_dir})",
            flush=True,
        )

    daemon.run(config, extensions=_load_extensions(), ready=ready)
    return 0


# ----------------------------------------------------------------- clients


def cmd_status(args: argparse.Namespace) -> int:
    status = control_call(args, "node.status")
    if args.json:
        print_json(status)
    else:
        print_kv_table(f"node {status.get('peer_id', '?')}", status)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    peers = control_call(args, "node.peers")
    if args.json:
        print_json(peers)
        return 0
    if not peers:
        print("no peers known yet")
        return 0
    peers = sorted(peers, key=lambda p: (not p.get("connected"), p.get("peer_id", "")))
    print_rows_table(
        f"{sum(1 for p in peers if p.get('connected'))} connected, {len(peers)} known",
        [
            ("peer id", "peer_id"),
            ("connected", "connected"),
            ("direction", "direction"),
            ("latency ms", "latency_ms"),
            ("remote address", "remote_addr"),
            ("bootstrap", "bootstrap"),
            ("failures", "failures"),
        ],
        peers,
    )
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    """From the daemon when one runs (its real addresses), else from the key file."""
    from gossamer.node import ControlClient, NoDaemon

    config = load_node_config(args)
    try:
        with ControlClient(config.data_dir) as client:
            status = client.call("node.status")
        peer_id, addrs, running = status["peer_id"], status["addrs"], True
    except NoDaemon:
        from gossamer.node import load_or_create

        peer_id = load_or_create(config.data_dir).peer_id
        addrs = [f"{addr}/p2p/{peer_id}" for addr in config.listen]
        running = False
    if args.json:
        print_json(
            {"peer_id": peer_id, "addrs": addrs, "running": running, "data_dir": config.data_dir}
        )
        return 0
    print(peer_id)
    for addr in addrs:
        print(f"  {addr}")
    if not running:
        print("  (configured listen addresses; no daemon is running)")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from gossamer.node import parse_multiaddr

    parse_multiaddr(args.addr, what="peer address", need_peer_id=True)
    result = control_call(args, "node.connect", {"addr": args.addr})
    if args.json:
        print_json(result)
    else:
        print(f"connected to {result['peer_id']}")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    import base58

    try:
        if not base58.b58decode(args.peer_id):
            raise ValueError
    except ValueError:
        raise CliError(f"{args.peer_id!r} is not a peer id (base58, like 12D3KooW…)") from None
    result = control_call(args, "node.ping", {"peer_id": args.peer_id})
    if args.json:
        print_json({"peer_id": args.peer_id, **result})
    else:
        print(f"{args.peer_id}: {result['rtt_ms']:.2f} ms")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    config = dataclasses.asdict(load_node_config(args))
    config["data_dir"] = str(config["data_dir"])
    if args.json:
        print_json(config)
    else:
        print_kv_table("effective config", config)
    return 0
