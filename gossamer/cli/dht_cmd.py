"""``gossamer dht …``: put, get and find providers through the running daemon's DHT.

Every command talks to the daemon's control API (``dht.*`` methods that the
DHT registers when it attaches to the node), so it starts in a fraction of a
second and never imports libp2p.

    gossamer dht put /gossamer/run/r1/note "hello" --ttl 600
    gossamer dht put /gossamer/run/r1/members '{"gpu": "a100"}' --json-value --subkey NAME
    gossamer dht get /gossamer/run/r1/note
    gossamer dht providers sha256-…
    gossamer dht provide sha256-…
    gossamer dht find-peer 12D3KooW…
    gossamer dht status
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from gossamer.cli.common import (
    CliError,
    add_json,
    add_location_args,
    control_call,
    print_json,
    print_kv_table,
    print_rows_table,
)

KEY_HELP = "a namespaced key: /gossamer/<kind>/<name>"
MAX_TTL_S = 7 * 24 * 3600


def register(subparsers: Any) -> None:
    dht = subparsers.add_parser("dht", help="store and find records in the DHT")
    sub = dht.add_subparsers(dest="dht_command", metavar="SUBCOMMAND", required=True)

    put = sub.add_parser("put", help="store VALUE under KEY (signed by this node)")
    put.add_argument("key", metavar="KEY", help=KEY_HELP)
    put.add_argument("value", metavar="VALUE", help="a string (or JSON with --json-value)")
    put.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        metavar="S",
        help="seconds until the record expires (default 3600)",
    )
    put.add_argument(
        "--subkey",
        metavar="NAME",
        help="store under this sub-key (one entry per writer; a peer id "
        "sub-key can only be written by that peer)",
    )
    put.add_argument("--json-value", action="store_true", help="parse VALUE as JSON")
    _common(put, cmd_put)

    get = sub.add_parser("get", help="what the DHT holds under KEY")
    get.add_argument("key", metavar="KEY", help=KEY_HELP)
    get.add_argument(
        "--any", action="store_true", help="the first answer found, not the newest across replicas"
    )
    _common(get, cmd_get)

    providers = sub.add_parser("providers", help="peers that announced content CID")
    providers.add_argument("content_id", metavar="CID", help="content id (e.g. a hash)")
    _common(providers, cmd_providers)

    provide = sub.add_parser("provide", help="announce that this node serves content CID")
    provide.add_argument("content_id", metavar="CID", help="content id (e.g. a hash)")
    _common(provide, cmd_provide)

    find_peer = sub.add_parser("find-peer", help="addresses of a peer, found through the DHT")
    find_peer.add_argument("peer_id", metavar="PEER_ID")
    _common(find_peer, cmd_find_peer)

    status = sub.add_parser("status", help="routing table and store of the daemon's DHT")
    _common(status, cmd_status)


def _common(parser: argparse.ArgumentParser, handler: Any) -> None:
    add_location_args(parser)
    add_json(parser)
    parser.set_defaults(handler=handler)


def _check_key(key: str) -> None:
    # The daemon checks too; this only saves a round trip on an obvious typo.
    if not key.startswith("/gossamer/") or key.count("/") < 3 or key.endswith("/"):
        raise CliError(f"{key!r} is not a DHT key: keys look like /gossamer/<kind>/<name>")


def _check_content_id(content_id: str) -> None:
    if not content_id or "/" in content_id:
        raise CliError(f"{content_id!r} is not a content id (a non-empty string without '/')")


def cmd_put(args: argparse.Namespace) -> int:
    _check_key(args.key)
    if not 0 < args.ttl <= MAX_TTL_S:
        raise CliError(f"--ttl must be between 0 and {MAX_TTL_S} seconds, got {args.ttl:g}")
    value: Any = args.value
    if args.json_value:
        try:
            value = json.loads(args.value)
        except json.JSONDecodeError as exc:
            raise CliError(f"VALUE is not valid JSON: {exc}") from None
    params = {"key": args.key, "value": value, "ttl": args.ttl}
    if args.subkey:
        params["subkey"] = args.subkey
    result = control_call(args, "dht.put", params)
    if args.json:
        print_json(result)
    else:
        where = f"{args.key}#{args.subkey}" if args.subkey else args.key
        print(f"stored {where} on {result['stored']} node(s), expires in {args.ttl:g} s")
    return 0


def _expires_in(expires_at: float) -> str:
    return f"{max(0.0, expires_at - time.time()):.0f} s"


def cmd_get(args: argparse.Namespace) -> int:
    _check_key(args.key)
    record = control_call(args, "dht.get", {"key": args.key, "latest": not args.any})
    if args.json:
        print_json(record)
        return 0 if record is not None else 1
    if record is None:
        print(f"{args.key}: not found")
        return 1
    if "value" in record:
        print(
            f"{args.key} = {_show(record['value'])}  (expires in "
            f"{_expires_in(record['expires_at'])})"
        )
    subkeys = record.get("subkeys") or {}
    if subkeys:
        rows = [
            {
                "subkey": name,
                "value": _show(item["value"]),
                "expires": _expires_in(item["expires_at"]),
                "signer": item.get("signer"),
            }
            for name, item in subkeys.items()
        ]
        print_rows_table(
            f"{args.key} ({len(rows)} sub-keys)",
            [
                ("sub-key", "subkey"),
                ("value", "value"),
                ("expires in", "expires"),
                ("signed by", "signer"),
            ],
            rows,
        )
    return 0


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def cmd_providers(args: argparse.Namespace) -> int:
    _check_content_id(args.content_id)
    providers = control_call(args, "dht.providers", {"content_id": args.content_id})
    if args.json:
        print_json(providers)
        return 0
    if not providers:
        print(f"no providers of {args.content_id}")
        return 1
    rows = [{**p, "expires": _expires_in(p["expires_at"])} for p in providers]
    print_rows_table(
        f"providers of {args.content_id}",
        [("peer", "peer_id"), ("addresses", "addrs"), ("expires in", "expires")],
        rows,
    )
    return 0


def cmd_provide(args: argparse.Namespace) -> int:
    _check_content_id(args.content_id)
    result = control_call(args, "dht.provide", {"content_id": args.content_id})
    if args.json:
        print_json(result)
    else:
        print(f"providing {args.content_id} (stored on {result['stored']} node(s))")
    return 0


def cmd_find_peer(args: argparse.Namespace) -> int:
    result = control_call(args, "dht.find_peer", {"peer_id": args.peer_id})
    if args.json:
        print_json(result)
        return 0 if result.get("addrs") else 1
    if not result.get("addrs"):
        print(f"{args.peer_id}: not found")
        return 1
    for addr in result["addrs"]:
        print(addr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = control_call(args, "dht.status")
    if args.json:
        print_json(status)
    else:
        print_kv_table("dht", status)
    return 0
