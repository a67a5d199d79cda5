"""The CLI's log setup (gossamer/logs.py)."""

from __future__ import annotations

import io
import logging
import sys

from gossamer.logs import setup_logging


def test_records_go_to_the_current_stderr_after_the_old_one_is_closed(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("info")
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    first.close()  # what pytest's capture does to the stream a handler was set up with
    try:
        logging.getLogger("gossamer.test").warning("still heard")
    finally:
        for name in ("gossamer", ""):
            logger = logging.getLogger(name)
            for h in [h for h in logger.handlers if type(h).__name__ == "_StderrHandler"]:
                logger.removeHandler(h)
        logging.getLogger("gossamer").propagate = True
    assert "WARNING test: still heard" in second.getvalue()
