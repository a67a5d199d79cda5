"""Shared pieces of the command line: errors, the argument parser, config, output.

A user's mistake must read as one line on stderr and a non-zero exit, never as
a traceback: :class:`ArgumentParser` turns argparse's complaints into
:class:`CliError`, and ``gossamer.cli.main`` prints any ``CliError`` (or
:class:`~gossamer.node.errors.GossamerError`) as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from gossamer.node import ControlClient, NodeConfig


class CliError(Exception):
    """A mistake in how the command was used: printed as one line, exit status 2."""

    exit_code = 2


def one_line(text: str) -> str:
    """Collapse whitespace and newlines so a message stays on one line."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`CliError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{one_line(message)} (see `{self.prog} --help`)")


def add_verbose(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``-v`` (our debug logs) / ``-vv`` (py-libp2p's too), usable before or after the command."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top_level else argparse.SUPPRESS,
        help="more logging: -v for gossamer debug logs, -vv to add py-libp2p's",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for machines")


def add_location_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``: where a node's settings and files live."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--data-dir", metavar="DIR", help="node data directory (identity, control file)"
    )


def add_node_args(parser: argparse.ArgumentParser) -> None:
    """The flags that override config keys for a node that starts (``node start``)."""
    add_location_args(parser)
    parser.add_argument(
        "--listen", action="append", metavar="MULTIADDR", help="listen address (repeatable)"
    )
    parser.add_argument(
        "--announce", action="append", metavar="MULTIADDR", help="address to advertise (repeatable)"
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="peer to stay connected to, ending in /p2p/<id> (repeatable)",
    )
    parser.add_argument(
        "--control-port", type=int, metavar="N", help="control API port on 127.0.0.1 (0 = any)"
    )
    parser.add_argument(
        "--dataplane-listen", metavar="HOST:PORT", help="tensor data plane listen address"
    )


def load_node_config(args: argparse.Namespace) -> NodeConfig:
    """Defaults < ``--config`` TOML < ``GOSSAMER_*`` env < flags present in ``args``."""
    from gossamer.node import load_config

    overrides = {
        key: getattr(args, attr, None)
        for key, attr in (
            ("data_dir", "data_dir"),
            ("listen", "listen"),
            ("announce", "announce"),
            ("bootstrap", "bootstrap"),
            ("control_port", "control_port"),
            ("dataplane_listen", "dataplane_listen"),
        )
    }
    if getattr(args, "verbose", 0):
        overrides["log_level"] = "debug"
    return load_config(getattr(args, "config", None), overrides=overrides)


def data_dir_of(args: argparse.Namespace) -> Path:
    """The data directory a client command should look in (same precedence as the daemon)."""
    return load_node_config(args).data_dir


def control_client(args: argparse.Namespace) -> ControlClient:
    """A client for the daemon of ``args``' data dir; NoDaemon if none is running."""
    from gossamer.node import ControlClient

    return ControlClient(data_dir_of(args))


def control_call(
    args: argparse.Namespace, method: str, params: Mapping[str, Any] | None = None
) -> Any:
    with control_client(args) as client:
        return client.call(method, params)


# ------------------------------------------------------------------ output


def print_json(value: Any) -> None:
    """One JSON document on stdout (sorted keys, so diffs and greps are stable)."""
    sys.stdout.write(json.dumps(value, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _console() -> Any:
    from rich.console import Console

    # Piped output is not cut to 80 columns: peer ids and multiaddrs are long,
    # and a truncated one is useless.
    width = None if sys.stdout.isatty() else 240
    return Console(highlight=False, width=width)


def format_value(value: Any) -> str:
    """A human rendering of one JSON value for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, list):
        return "\n".join(format_value(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) if value else "-"
    return str(value)


def print_kv_table(title: str, values: Mapping[str, Any]) -> None:
    """Two columns, key and value; nested dicts are flattened as ``a.b``."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in _flatten(values):
        table.add_row(key, format_value(value))
    _console().print(table)


def print_rows_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Mapping[str, Any]]
) -> None:
    """A table with ``columns`` = [(header, key)] and one row per mapping."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(format_value(row.get(key)) for _, key in columns))
    _console().print(table)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out
