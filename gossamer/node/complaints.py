"""Misbehaviour log lines, at most one per peer per interval, with a count of the rest.

A hostile peer can provoke failures as fast as it can send; logging each one (with a traceback)
turns it into a disk-filling tool.  :class:`Complaints` decides whether a line is due (pure: the
clock is injected) and counts what it held back, so the next line says how many there were.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PEERS = 4096  # peers remembered; the oldest is forgotten first


class Complaints:
    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()  # peer -> (at, held)
        self.total = 0

    def due(self, peer_id: str) -> int | None:
        """None if a line for ``peer_id`` is not due yet (it is counted); else how many
        lines were held back since the last one."""
        self.total += 1
        now = self._clock()
        last = self._last.get(peer_id)
        if last is not None and now - last[0] < self.interval:
            self._last[peer_id] = (last[0], last[1] + 1)
            return None
        self._last[peer_id] = (now, 0)
        self._last.move_to_end(peer_id)
        while len(self._last) > MAX_PEERS:
            self._last.popitem(last=False)
        return 0 if last is None else last[1]

    def log(self, logger: logging.Logger, peer_id: str, message: str, *args: object) -> None:
        """``logger.warning(message)`` for ``peer_id`` when due, naming what was held back."""
        held = self.due(peer_id)
        if held is None:
            return
        suffix = f" (and {held} more from this peer since)" if held else ""
        logger.warning(message + suffix, *args)


__all__ = ["Complaints"]
