"""``gossamer`` — the command line entry point.

Command groups live in ``gossamer/cli/<group>_cmd.py`` and expose
``register(subparsers) -> None``; each subcommand sets ``handler`` (a function
``(args) -> int``) with ``set_defaults``.  To add a group, append its module
name to :data:`COMMAND_MODULES`.

A group whose module cannot be imported because a dependency is missing (for
example torch, for the training commands on a relay machine) does not break
the rest of the CLI: its command is still listed and, only when used, says
what is missing.  A module that does not exist at all is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from gossamer import __version__
from gossamer.cli.common import ArgumentParser, CliError, add_verbose, one_line

log = logging.getLogger(__name__)

# Modules under gossamer.cli that register command groups, in --help order.
COMMAND_MODULES: tuple[str, ...] = (
    "node_cmd",
    "dht_cmd",
    "run_cmd",
    "experts_cmd",
    "demo_cmd",
    "bench_cmd",
    "fuzz_cmd",
)


def _register_unavailable(subparsers: Any, name: str, exc: ImportError) -> None:
    """A stand-in command that explains why the real one cannot load."""
    missing = exc.name or str(exc)
    hint = " (pip install 'gossamer[train]')" if missing.split(".")[0] == "torch" else ""
    message = f"`gossamer {name}` is unavailable: cannot import {missing}{hint}"

    def unavailable(args: argparse.Namespace) -> int:
        raise CliError(message)

    parser = subparsers.add_parser(name, help="(unavailable here)", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=unavailable)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="gossamer",
        description="Train models together over a peer-to-peer network.",
    )
    parser.add_argument("--version", action="version", version=f"gossamer {__version__}")
    add_verbose(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        qualified = f"gossamer.cli.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ImportError as exc:
            if exc.name == qualified:
                continue  # the group is not part of this build
            _register_unavailable(subparsers, module_name.removesuffix("_cmd"), exc)
            continue
        module.register(subparsers)
    return parser


def _expected_error_in(exc: BaseException) -> BaseException | None:
    """The error worth one line inside ``exc``: a GossamerError or an OSError
    (a port in use, a directory we may not write), itself or a leaf of a trio
    exception group; None for anything else, which is a bug."""
    from gossamer.node import GossamerError

    if isinstance(exc, GossamerError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _expected_error_in(inner)
            if found is not None:
                return found
    return None


def _fail(message: str) -> None:
    sys.stderr.write(f"gossamer: error: {one_line(message)}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 failure, 2 usage or config mistake)."""
    from gossamer.logs import setup_logging
    from gossamer.node import ConfigError

    verbose = 0
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        setup_logging(
            "debug" if verbose else "warning", libp2p_level="debug" if verbose >= 2 else None
        )
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gossamer peers | head -1`
        return 1
    except CliError as exc:
        _fail(str(exc))
        return CliError.exit_code
    except Exception as exc:
        error = _expected_error_in(exc)
        if verbose:
            traceback.print_exception(exc)
        if error is None:
            _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
            return 1
        _fail(str(error) or type(error).__name__)
        return 2 if isinstance(error, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
