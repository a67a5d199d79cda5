"""A user-space link shaper: the real bytes of a node's TCP traffic, paced and delayed.

Our users sit behind home links (20–500 Mbit/s, tens of milliseconds away); ``tc netem`` is not
available to tests, so a node can shape its own traffic instead.  With ``[node.shape]`` (or
``GOSSAMER_SHAPE``) set, every TCP connection the node makes or accepts — libp2p's (RPC, DHT, run
document, the data plane's libp2p fallback) and the data plane's direct sockets — is wrapped in a
:class:`ShapedStream`:

* **uplink**: the bytes this node sends cross one serializer shared by all its connections at
  ``up_mbit`` (a sender waits for its bytes to cross, as for a NIC's queue), then a per-connection
  delay line holds them for ``latency_ms`` ± ``jitter_ms`` before they reach the socket, in order;
* **downlink**: the bytes it receives are read from the socket no faster than ``down_mbit``, all
  connections together, so a fast sender is held back by TCP's own flow control;
* **loss**: TCP never loses bytes, it delays them: each 1448-byte segment is lost with
  probability ``loss`` and a lost one costs its chunk (and, in order, the ones behind it) one more
  round trip (fast retransmit, 2 × latency, ≥ 1 ms).  Congestion-window collapse is not modelled.

One-way latency belongs to the sender: two nodes shaped to 50 ms see a 100 ms round trip.  The
shaper meters what crosses it (:class:`LinkMeter`), so a bench can read the peak rate a method
needed from the link, not from a model.  The rules are pure (a serializer, a delay line, a meter,
each taking ``now``); :class:`ShapedStream` only moves bytes at the times they give.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from gossamer.node.errors import ConfigError
from gossamer.node.tables import typed_fields

CHUNK_BYTES = 16 << 10  # the unit that is paced and delayed: ~1.3 ms at 100 Mbit/s
SEGMENT_BYTES = 1448  # a TCP segment on a 1500-byte MTU, for the loss model
# Bytes one connection may hold in its delay line: a TCP window.  4 MiB keeps a 50 ms link
# above 600 Mbit/s per connection while a sender without a rate limit cannot queue unbounded.
WINDOW_BYTES = 4 << 20
CLOSE_FLUSH_S = 5.0  # aclose() lets the delay line drain this long before it drops the rest
METER_BIN_S = 0.01
METER_HORIZON_S = 3600.0


@dataclass(frozen=True)
class LinkShape:
    """One node's access link.  Zero means "not limited"; an all-zero shape shapes nothing."""

    up_mbit: float = 0.0  # uplink rate, Mbit/s (10^6 bits)
    down_mbit: float = 0.0  # downlink rate, Mbit/s
    latency_ms: float = 0.0  # one-way delay added to every byte this node sends
    jitter_ms: float = 0.0  # ± uniform on top of the latency (order is kept, as in TCP)
    loss: float = 0.0  # probability that one 1448-byte segment is lost (and resent)
    seed: int | None = None  # of the jitter/loss draws (None: a fresh one)

    @property
    def active(self) -> bool:
        return any((self.up_mbit, self.down_mbit, self.latency_ms, self.jitter_ms, self.loss))

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any], source: str, from_text: bool = False
    ) -> LinkShape:
        shape = cls(**typed_fields(cls, table, source, from_text=from_text))
        shape.check(source)
        return shape

    @classmethod
    def parse(cls, text: str, source: str = "GOSSAMER_SHAPE") -> LinkShape:
        """``"up_mbit=100,down_mbit=100,latency_ms=50"`` (commas or spaces between pairs)."""
        table: dict[str, str] = {}
        for item in text.replace(",", " ").split():
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"{source}: expected key=value pairs, got {item!r}")
            table[key.strip()] = value.strip()
        return cls.from_table(table, source, from_text=True)

    def check(self, source: str) -> None:
        for name in ("up_mbit", "down_mbit", "latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{source}: {name} must be a finite number ≥ 0, got {value}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"{source}: loss must be in [0, 1), got {self.loss}")

    def describe(self) -> str:
        if not self.active:
            return "unshaped"
        parts = [
            f"{name}={getattr(self, name):g}"
            for name in ("up_mbit", "down_mbit", "latency_ms", "jitter_ms", "loss")
            if getattr(self, name)
        ]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# ------------------------------------------------------------------------------- pure rules


class Serializer:
    """One direction of the access link: when bytes offered at ``now`` have crossed it."""

    def __init__(self, mbit: float) -> None:
        self.bytes_per_s = mbit * 1e6 / 8
        self.free_at = -math.inf

    def finish(self, now: float, nbytes: int) -> float:
        if self.bytes_per_s <= 0:
            return now
        start = max(now, self.free_at)
        self.free_at = start + nbytes / self.bytes_per_s
        return self.free_at


class DelayLine:
    """Latency, jitter and loss of one connection's direction; arrivals stay in order."""

    def __init__(self, shape: LinkShape, rng: random.Random) -> None:
        self.latency = shape.latency_ms / 1000
        self.jitter = shape.jitter_ms / 1000
        self.loss = shape.loss
        self.rng = rng
        self.last = -math.inf

    def arrival(self, sent: float, nbytes: int) -> float:
        delay = self.latency
        if self.jitter:
            delay = max(0.0, delay + self.rng.uniform(-self.jitter, self.jitter))
        if self.loss:
            segments = max(1, -(-nbytes // SEGMENT_BYTES))
            if self.rng.random() < 1 - (1 - self.loss) ** segments:
                delay += max(2 * self.latency, 0.001)
        self.last = max(sent + delay, self.last)
        return self.last


class LinkMeter:
    """Bytes that crossed the link per direction, in bins of ``METER_BIN_S``; peak rates."""

    def __init__(self, bin_s: float = METER_BIN_S, horizon_s: float = METER_HORIZON_S) -> None:
        self.bin_s = bin_s
        self.keep = max(1, int(horizon_s / bin_s))
        self.bins: dict[str, deque[tuple[int, int]]] = {"up": deque(), "down": deque()}
        self.totals = {"up": 0, "down": 0}

    def add(self, now: float, direction: str, nbytes: int) -> None:
        bins = self.bins[direction]
        index = int(now / self.bin_s)
        if bins and bins[-1][0] == index:
            bins[-1] = (index, bins[-1][1] + nbytes)
        else:
            bins.append((index, nbytes))
            while bins and bins[0][0] <= index - self.keep:
                bins.popleft()
        self.totals[direction] += nbytes

    def peak_mbit(self, direction: str, window_s: float = 1.0, since: float | None = None) -> float:
        """The highest rate over any ``window_s`` (a multiple of the bin) since ``since``."""
        width = max(1, round(window_s / self.bin_s))
        first = -math.inf if since is None else int(since / self.bin_s)
        window: deque[tuple[int, int]] = deque()
        inside = best = 0
        for index, nbytes in self.bins[direction]:
            if index < first:
                continue
            window.append((index, nbytes))
            inside += nbytes
            while window[0][0] <= index - width:
                inside -= window.popleft()[1]
            best = max(best, inside)
        return best * 8 / (width * self.bin_s) / 1e6


# ------------------------------------------------------------------------------------ I/O


class Shaper:
    """One node's link: its shape, the two serializers all its connections share, the meter."""

    def __init__(self, shape: LinkShape, clock: Callable[[], float] = trio.current_time) -> None:
        self.shape = shape
        self.clock = clock
        self.up = Serializer(shape.up_mbit)
        self.down = Serializer(shape.down_mbit)
        self.meter = LinkMeter()
        self.rng = random.Random(shape.seed)
        self._nursery: trio.Nursery | None = None

    @property
    def active(self) -> bool:
        return self.shape.active

    def start(self, nursery: trio.Nursery) -> None:
        """Run the connections' delay lines in ``nursery`` (the node's)."""
        self._nursery = nursery

    def wrap(self, stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
        """``stream`` shaped by this link (unchanged when the shape is empty)."""
        if not self.active:
            return stream
        if self._nursery is None:
            raise RuntimeError("the shaper is not started (Shaper.start)")
        return ShapedStream(stream, self, self._nursery)

    def stats(self, since: float | None = None) -> dict[str, Any]:
        return {
            "shape": self.shape.describe(),
            "bytes_up": self.meter.totals["up"],
            "bytes_down": self.meter.totals["down"],
            "peak_up_mbit": round(self.meter.peak_mbit("up", since=since), 3),
            "peak_down_mbit": round(self.meter.peak_mbit("down", since=since), 3),
        }


class ShapedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose bytes cross ``shaper``'s link (see the module docs)."""

    def __init__(self, inner: trio.SocketStream, shaper: Shaper, nursery: trio.Nursery) -> None:
        self._inner = inner
        self._shaper = shaper
        self._nursery = nursery
        self._line = DelayLine(shaper.shape, shaper.rng)
        self._queue_in, self._queue_out = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._in_flight = 0
        self._room = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._error: BaseException | None = None
        self._pump_started = False
        self._send_lock = trio.Lock()
        self._closed = False

    @property
    def socket(self) -> Any:
        return self._inner.socket

    def setsockopt(self, *args: Any) -> None:
        self._inner.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._inner.getsockopt(*args)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            if self._closed:
                raise trio.ClosedResourceError("the shaped stream is closed")
            if not self._pump_started:
                self._pump_started = True
                self._nursery.start_soon(self._pump)
            view = memoryview(data).cast("B")
            for offset in range(0, len(view), CHUNK_BYTES):
                self._raise_pump_error()
                while self._in_flight >= WINDOW_BYTES:
                    self._room = trio.Event()
                    await self._room.wait()
                    self._raise_pump_error()
                chunk = bytes(view[offset : offset + CHUNK_BYTES])  # the caller may reuse data
                now = self._shaper.clock()
                crossed = self._shaper.up.finish(now, len(chunk))
                self._shaper.meter.add(crossed, "up", len(chunk))
                self._in_flight += len(chunk)
                self._drained = trio.Event()
                self._queue_in.send_nowait((self._line.arrival(crossed, len(chunk)), chunk))
                await trio.sleep_until(crossed)
            await trio.lowlevel.checkpoint()

    def _raise_pump_error(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(f"shaped connection broke: {self._error!r}")

    async def _pump(self) -> None:
        try:
            async for arrival, chunk in self._queue_out:
                await trio.sleep_until(arrival)
                await self._inner.send_all(chunk)
                self._in_flight -= len(chunk)
                self._room.set()
                if self._in_flight == 0:
                    self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._error = exc
        finally:
            self._room.set()
            self._drained.set()

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = CHUNK_BYTES if max_bytes is None else min(max_bytes, CHUNK_BYTES)
        data = await self._inner.receive_some(limit)
        if data:
            crossed = self._shaper.down.finish(self._shaper.clock(), len(data))
            self._shaper.meter.add(crossed, "down", len(data))
            await trio.sleep_until(crossed)
        return data

    async def _flush(self) -> None:
        with trio.move_on_after(CLOSE_FLUSH_S):
            await self._drained.wait()

    async def send_eof(self) -> None:
        async with self._send_lock:
            await self._flush()
            await self._inner.send_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._flush()
            self._queue_in.close()
        await self._inner.aclose()


__all__ = ["DelayLine", "LinkMeter", "LinkShape", "Serializer", "ShapedStream", "Shaper"]
