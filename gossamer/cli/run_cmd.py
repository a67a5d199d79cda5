"""``gossamer run …``: training runs.

``gossamer run status RUN`` asks the running daemon (control method
``run.status``, registered by :mod:`gossamer.crdt.sync`) for the run
document and prints its members, round and metrics as tables (``--json``:
the whole document as one JSON object).  It never imports libp2p or pycrdt.

Extending: ``run host`` / ``run join`` (training) add their own subparsers in
:func:`register` next to ``status``; each sets ``handler`` with
``set_defaults`` and returns an exit code.
"""

from __future__ import annotations

import argparse
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


def register(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="host, join and inspect training runs")
    run_sub = run.add_subparsers(dest="run_command", metavar="SUBCOMMAND", required=True)
    from gossamer.cli import run_admin, run_train  # run_train imports torch only when used

    run_train.add_parsers(run_sub)
    run_admin.add_parsers(run_sub)
    add_status_parser(run_sub)


def add_status_parser(run_sub: Any) -> argparse.ArgumentParser:
    status = run_sub.add_parser(
        "status", help="members, round and metrics of a run (from the running daemon)"
    )
    status.add_argument("run", metavar="RUN", help="run id (or a unique prefix of one)")
    add_location_args(status)
    add_json(status)
    status.set_defaults(handler=cmd_status)
    return status


def _short(peer_id: str) -> str:
    return f"…{peer_id[-10:]}" if len(peer_id) > 12 else peer_id


def cmd_status(args: argparse.Namespace) -> int:
    from gossamer.node import ControlError

    try:
        snapshot = control_call(args, "run.status", {"run": args.run})
    except ControlError as exc:
        if exc.type == "unknown_method":
            raise CliError(
                "the running daemon does not serve run documents "
                "(it was started without gossamer.crdt)"
            ) from None
        raise CliError(exc.message) from None
    if args.json:
        print_json(snapshot)
    else:
        print_status(snapshot)
    return 0


def print_status(snapshot: dict[str, Any]) -> None:
    """Human tables for a ``run.status`` snapshot (see RunDocument.snapshot)."""
    round_info = snapshot.get("round") or {}
    totals = snapshot.get("totals") or {}
    sync = snapshot.get("sync") or {}
    print_kv_table(
        f"run {snapshot.get('run_id', '?')}",
        {
            "access": snapshot.get("access"),
            "hosts": [_short(h) for h in snapshot.get("hosts", [])],
            "round": round_info.get("step"),
            "round status": round_info.get("status"),
            "members": len(snapshot.get("members", [])),
            "tokens": totals.get("tokens"),
            "bytes sent": totals.get("bytes_sent"),
            "links": len(sync.get("links", [])),
            "config": snapshot.get("config") or {},
        },
    )
    participants = round_info.get("participants") or {}
    metrics = snapshot.get("metrics") or {}
    rows = []
    for member in snapshot.get("members", []):
        peer = member.get("peer_id", "")
        rows.append(
            {
                "peer": _short(peer),
                "role": member.get("role"),
                "round": (participants.get(peer) or {}).get("status", "-"),
                "heartbeat": None
                if member.get("heartbeat_age_s") is None
                else f"{member['heartbeat_age_s']:.0f} s ago",
                "tokens/s": member.get("tokens_per_s"),
            }
        )
    print_rows_table(
        "members",
        [
            ("peer", "peer"),
            ("role", "role"),
            ("round", "round"),
            ("heartbeat", "heartbeat"),
            ("tokens/s", "tokens/s"),
        ],
        rows,
    )
    print_rows_table(
        "metrics",
        [
            ("peer", "peer"),
            ("step", "step"),
            ("loss", "loss"),
            ("tokens", "tokens"),
            ("bytes sent", "bytes_sent"),
            ("bytes received", "bytes_recv"),
            ("tokens/s", "tokens_per_s"),
        ],
        ({"peer": _short(p), **m} for p, m in sorted(metrics.items())),
    )
