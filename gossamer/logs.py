"""Logging setup shared by the daemon and the CLI.

Every gossamer module logs through ``logging.getLogger(__name__)`` (the ``gossamer.*`` tree).
:func:`setup_logging` sends that tree to stderr in one compact format, so an
operator reads one stream: stdout stays free for the machine-readable output
of CLI commands (``--json``) and the daemon's ready line.

py-libp2p's own records are re-emitted under ``gossamer.libp2p.*`` by
:func:`gossamer.node._libp2p_compat.route_libp2p_logging` (the node calls it
when it starts), so they reach the same handler; this module only sets how much
of that tree gets through.  It never imports libp2p itself: client commands
such as ``gossamer node status`` must stay fast.
"""

from __future__ import annotations

import logging
import sys

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_MARK = "_gossamer_handler"


class _CompactFormatter(logging.Formatter):
    """``12:34:56.789 INFO  node: message`` — the ``gossamer.`` prefix is implied."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        if name.startswith("gossamer."):
            record = logging.makeLogRecord(record.__dict__)
            record.name = name[len("gossamer.") :]
        return super().format(record)


def parse_level(level: int | str) -> int:
    """``"info"``/``"DEBUG"``/``20`` → a logging level; ValueError for anything else."""
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)") from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream it was at
    setup: a caller that swaps stderr (pytest's capture, a daemon redirecting its output) and
    closes the old one would otherwise turn every later record into a "Logging error"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(
    level: int | str = logging.INFO, *, libp2p_level: int | str | None = None
) -> None:
    """Route ``gossamer.*`` (and libp2p, via ``gossamer.libp2p``) to stderr at ``level``.

    ``libp2p_level`` defaults to WARNING, or INFO when ``level`` is DEBUG:
    py-libp2p's debug output is a flood that hides our own lines, so it needs
    its own opt-in (``-vv`` in the CLI).  Third-party records that reach the
    root logger (some py-libp2p modules log there directly) are shown from
    WARNING up in the same format.  Calling this again replaces the previous
    setup instead of adding a second handler.
    """
    numeric = parse_level(level)
    if libp2p_level is None:
        floor = logging.INFO if numeric <= logging.DEBUG else logging.WARNING
        libp2p_numeric = max(numeric, floor)
    else:
        libp2p_numeric = parse_level(libp2p_level)

    handler = _StderrHandler()
    handler.setFormatter(_CompactFormatter())
    setattr(handler, _MARK, True)

    for name, lvl in (("gossamer", numeric), ("", logging.WARNING)):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(lvl)
    # Our records are handled on "gossamer"; do not print them twice via root.
    logging.getLogger("gossamer").propagate = False
    logging.getLogger("gossamer.libp2p").setLevel(libp2p_numeric)
