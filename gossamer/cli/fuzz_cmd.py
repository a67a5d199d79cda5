"""``gossamer fuzz [PROTOCOL…] --inputs N [--seconds S] [--json]``: the fuzz campaign.

Starts a target node in a child process and attacks it through real streams on loopback (see
:mod:`gossamer.bench.fuzz`); prints per protocol what was sent, what the target did with it,
crashes and the target's memory.  Exit status 1 when the target crashed or stopped serving.
"""

from __future__ import annotations

import argparse
from typing import Any

from gossamer.cli.common import print_json, print_kv_table


def register(subparsers: Any) -> None:
    from gossamer.bench import fuzz

    parser = subparsers.add_parser(
        "fuzz",
        help="attack a local node with generated inputs, protocol by protocol",
        description=(__doc__ or "").strip().splitlines()[0],
    )
    fuzz.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from gossamer.bench import fuzz

    result = fuzz.run(args)
    if args.json:
        print_json(result)
    else:
        rows = {
            name: (
                f"{p['inputs']} inputs ({p['inputs_per_s']}/s), crashes {p['crashes']}, "
                f"served honest after: {p['served_honest_after']}, rss {p['target_rss_mb']} MB"
            )
            for name, p in result["protocols"].items()
        }
        print_kv_table("gossamer fuzz", {**rows, "target peak rss MB": result["rss_peak_mb"]})
    healthy = result["crashes"] == 0 and all(
        p["served_honest_after"] for p in result["protocols"].values()
    )
    return 0 if healthy else 1
