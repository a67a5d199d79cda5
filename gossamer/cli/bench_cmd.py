"""``gossamer bench <name> [--json] [bench arguments]``: run ``gossamer.bench.<name>``.

A bench module exposes ``add_arguments(parser)`` and ``run(args) -> dict``
(see docs/CONVENTIONS.md).  Names are discovered from the package directory
without importing the modules (a bench may import torch); only the chosen one
is imported, and its own arguments are parsed by a parser it fills in.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any

from gossamer.cli.common import (
    ArgumentParser,
    CliError,
    print_json,
    print_kv_table,
)


def available() -> list[str]:
    """Bench names: the public modules of ``gossamer.bench``."""
    import gossamer.bench

    return sorted(
        info.name
        for info in pkgutil.iter_modules(gossamer.bench.__path__)
        if not info.name.startswith("_")
    )


def register(subparsers: Any) -> None:
    names = available()
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a benchmark; `gossamer bench NAME --help` shows its arguments. "
        f"Available: {', '.join(names) or '(none installed)'}.",
    )
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(names) or '(none)'}")
    rest = parser.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    rest.required = False  # argparse marks REMAINDER required: "NAME, bench_args" otherwise
    parser.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        raise CliError(f"unknown bench {args.name!r} (available: {', '.join(names) or 'none'})")
    module = importlib.import_module(f"gossamer.bench.{args.name}")
    parser = ArgumentParser(
        prog=f"gossamer bench {args.name}",
        description=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_args)
    result = module.run(bench_args)
    if not isinstance(result, dict):
        raise CliError(f"bench {args.name!r} returned {type(result).__name__}, not a dict")
    if bench_args.json:
        print_json(result)
    else:
        print_kv_table(f"bench {args.name}", result)
    return 0
