"""``gossamer run invite|admit|revoke``: who may join a run, decided by its creator.

Each command acts as the run's creator, with the identity in ``--data-dir`` (default: the
worker directory ``gossamer run host`` uses). When a node holding the run runs there (a
``run host`` in the foreground, or a daemon), the command goes to it over the control API, so the
new charter reaches the members at once and a revoked member is cut off mid-run. With no node
running, ``admit``/``revoke`` amend the stored charter (the next ``run host`` publishes it) and
``invite`` signs a token offline (uses are counted by the creator's node when redeemed).

``gossamer run invite RUN --ttl 2h --uses 1`` prints one token; the guest runs
``gossamer run join RUN --invite TOKEN --bootstrap <the creator's address>``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from gossamer.cli.common import CliError, add_json, print_json

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def add_parsers(run_sub: Any) -> None:
    invite = run_sub.add_parser("invite", help="print an invite token for a restricted run")
    invite.add_argument("run", metavar="RUN", help="run id (or a unique prefix of one)")
    invite.add_argument(
        "--ttl", type=parse_duration, default=24 * 3600.0, help="valid for (default 24h)"
    )
    invite.add_argument(
        "--uses", type=int, default=1, help="how many peers may join with it (0: any; default 1)"
    )
    _common(invite)
    invite.set_defaults(handler=cmd_invite)
    for name, verb in (("admit", "let PEER_ID into"), ("revoke", "put PEER_ID out of")):
        sub = run_sub.add_parser(name, help=f"{verb} a run (amends its charter)")
        sub.add_argument("run", metavar="RUN", help="run id (or a unique prefix of one)")
        sub.add_argument("peer", metavar="PEER_ID")
        _common(sub)
        sub.set_defaults(handler=cmd_amend, verb=name)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the creator's directory (default: the worker's)"
    )
    add_json(parser)


def _data_dir(args: argparse.Namespace) -> Path:
    from gossamer.node import default_data_dir

    return Path(args.data_dir) if args.data_dir else default_data_dir() / "worker"


def cmd_invite(args: argparse.Namespace) -> int:
    from gossamer.crdt.admin import RunAdmin
    from gossamer.node import GossamerError

    if args.uses < 0:
        raise CliError("--uses must be 0 (any number) or more")
    try:
        result = RunAdmin(_data_dir(args)).invite(args.run, ttl=args.ttl, uses=args.uses)
    except GossamerError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json({**result.answer, "live": result.live})
    else:
        print(result.answer["invite"])
    return 0


def cmd_amend(args: argparse.Namespace) -> int:
    from gossamer.crdt.admin import RunAdmin
    from gossamer.node import GossamerError

    admin = RunAdmin(_data_dir(args))
    try:
        if args.verb == "admit":
            result = admin.admit(args.run, args.peer)
        else:
            result = admin.revoke(args.run, args.peer)
    except GossamerError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json({**result.answer, "live": result.live})
    else:
        where = (
            "the running node"
            if result.live
            else "the stored charter (published when the run next starts)"
        )
        done = "admitted" if args.verb == "admit" else "revoked"
        print(f"{done} {args.peer} (charter version {result.answer['version']}, {where})")
    return 0
