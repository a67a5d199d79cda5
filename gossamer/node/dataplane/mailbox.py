"""Where incoming messages land: receives posted ahead, or memory allocated on arrival.

A receiver that posts its receive (with preallocated buffers) before the
message arrives gets the bytes decrypted straight into its memory.  A message
that arrives first is allocated from a bounded per-node budget and waits for
its receiver; past the budget the channel holds the sender back until a
receive is posted, and after ``unsolicited_timeout`` the message is refused
(the sender gets an error), so a peer cannot make us buffer without bound.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gossamer.node.complaints import Complaints
from gossamer.node.dataplane.channel import Delivery
from gossamer.node.dataplane.tensors import BufferSpec, allocate, check_matches, describe
from gossamer.node.errors import DeadlineExceeded, SpecMismatch, TransferError

log = logging.getLogger(__name__)


@dataclass
class Received:
    """A message that arrived whole and verified."""

    peer_id: str
    tag: str
    tensors: dict[str, Any]
    nbytes: int
    seconds: float = 0.0
    path: str = ""
    arrived_at: float = field(default_factory=lambda: trio.current_time())

    def __getitem__(self, name: str) -> Any:
        return self.tensors[name]


@dataclass
class PendingReceive:
    """A receive posted ahead of its message; ``await wait()`` for the result."""

    peer_id: str | None
    tag: str
    into: dict[str, Any] | None
    _done: trio.Event = field(default_factory=trio.Event)
    _result: Received | None = None
    _error: BaseException | None = None
    _mailbox: Mailbox | None = None

    def _resolve(self, result: Received | None, error: BaseException | None) -> None:
        if not self._done.is_set():
            self._result, self._error = result, error
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, timeout: float | None = None) -> Received:
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            await self._done.wait()
        if not self._done.is_set():
            self.cancel()
            raise DeadlineExceeded(
                f"no message {self.tag!r} from {(self.peer_id or 'any peer')[-8:]} "
                f"within {timeout} s"
            )
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        if self._mailbox is not None:
            self._mailbox._unpost(self)
        self._resolve(None, TransferError("receive cancelled"))


# What an early arrival costs besides its bytes (its record, its buffers' headers): without it,
# empty messages would be free, and a peer could park millions of them (and their log lines).
UNSOLICITED_OVERHEAD_BYTES = 4096


class Mailbox:
    def __init__(
        self,
        budget_bytes: int,
        unsolicited_timeout: float = 30.0,
        per_peer_budget_bytes: int | None = None,
        complaints: Complaints | None = None,
    ) -> None:
        self._posted: dict[tuple[str | None, str], collections.deque[PendingReceive]] = (
            collections.defaultdict(collections.deque)
        )
        self._arrived: dict[tuple[str, str], collections.deque[Received]] = collections.defaultdict(
            collections.deque
        )
        self._budget = budget_bytes
        # one peer's early arrivals may use this much of the budget, so that one sender
        # cannot hold back everyone else's
        self._per_peer = (
            per_peer_budget_bytes if per_peer_budget_bytes is not None else budget_bytes
        )
        self._used = 0
        self._used_by: collections.Counter[str] = collections.Counter()
        self._posted_event = trio.Event()
        self._unsolicited_timeout = unsolicited_timeout
        self._complaints = complaints if complaints is not None else Complaints()
        self._guards: dict[str, Callable[[str], bool]] = {}

    @property
    def unsolicited_bytes(self) -> int:
        return self._used

    def post(self, peer_id: str | None, tag: str, into: dict[str, Any] | None) -> PendingReceive:
        pending = PendingReceive(peer_id, tag, into, _mailbox=self)
        if into is not None:
            for name, buffer in into.items():
                describe(name, buffer, writable=True)  # fail now, not when bytes arrive
        queued = self._take_arrived(peer_id, tag)
        if queued is not None:
            self._hand_over(pending, queued)
            return pending
        self._posted[(peer_id, tag)].append(pending)
        self._posted_event.set()
        self._posted_event = trio.Event()
        return pending

    def drop(self, tag_prefix: str) -> int:
        """Forget everything under ``tag_prefix``: posted receives fail, early arrivals are freed.

        A protocol that abandons an attempt (a collective retried without a
        dead member) calls this so stragglers of the old attempt do not sit in
        memory.  Returns how many arrived messages were freed.
        """
        for key in [k for k in self._posted if k[1].startswith(tag_prefix)]:
            for pending in self._posted.pop(key):
                pending._resolve(None, TransferError(f"receive {pending.tag!r} was dropped"))
        freed = 0
        for key in [k for k in self._arrived if k[1].startswith(tag_prefix)]:
            for received in self._arrived.pop(key):
                self._release(received.peer_id, received.nbytes)
                freed += 1
        return freed

    def expire(self, max_age: float) -> int:
        """Free early arrivals nobody received within ``max_age`` seconds."""
        now = trio.current_time()
        freed = 0
        for key in list(self._arrived):
            queue = self._arrived[key]
            while queue and now - queue[0].arrived_at > max_age:
                received = queue.popleft()
                self._release(received.peer_id, received.nbytes)
                freed += 1
                self._complaints.log(
                    log,
                    received.peer_id,
                    "dropping message %r from %s: nobody received it in %.0f s",
                    received.tag,
                    received.peer_id[-8:],
                    max_age,
                )
            if not queue:
                del self._arrived[key]
        return freed

    def _unpost(self, pending: PendingReceive) -> None:
        queue = self._posted.get((pending.peer_id, pending.tag))
        if queue and pending in queue:
            queue.remove(pending)

    def _fits(self, peer_id: str, total: int) -> bool:
        cost = total + UNSOLICITED_OVERHEAD_BYTES
        return self._used + cost <= self._budget and self._used_by[peer_id] + cost <= self._per_peer

    def _charge(self, peer_id: str, nbytes: int) -> None:
        self._used += nbytes + UNSOLICITED_OVERHEAD_BYTES
        self._used_by[peer_id] += nbytes + UNSOLICITED_OVERHEAD_BYTES

    def _release(self, peer_id: str, nbytes: int) -> None:
        self._used -= nbytes + UNSOLICITED_OVERHEAD_BYTES
        self._used_by[peer_id] -= nbytes + UNSOLICITED_OVERHEAD_BYTES
        if self._used_by[peer_id] <= 0:
            del self._used_by[peer_id]

    def _take_arrived(self, peer_id: str | None, tag: str) -> Received | None:
        keys = (
            [(peer_id, tag)] if peer_id is not None else [k for k in self._arrived if k[1] == tag]
        )
        for key in keys:
            queue = self._arrived.get(key)
            if queue:
                received = queue.popleft()
                if not queue:
                    del self._arrived[key]
                self._release(received.peer_id, received.nbytes)
                return received
        return None

    def _hand_over(self, pending: PendingReceive, received: Received) -> None:
        """Give an early message to a late receive (one copy if it brought buffers)."""
        if pending.into is None:
            pending._resolve(received, None)
            return
        try:
            for name, target in pending.into.items():
                if name not in received.tensors:
                    raise SpecMismatch(f"message {received.tag!r} has no buffer {name!r}")
                src_spec, src = describe(name, received.tensors[name])
                dst_spec, dst = describe(name, target, writable=True)
                check_matches(src_spec, dst_spec)
                dst[:] = src
        except SpecMismatch as exc:
            pending._resolve(None, exc)
            return
        pending._resolve(
            Received(
                received.peer_id,
                received.tag,
                dict(pending.into),
                received.nbytes,
                received.seconds,
                received.path,
            ),
            None,
        )

    def _find_posted(self, peer_id: str, tag: str) -> PendingReceive | None:
        for key in ((peer_id, tag), (None, tag)):
            queue = self._posted.get(key)
            while queue:
                pending = queue.popleft()
                if not queue:
                    del self._posted[key]
                if not pending.done:
                    return pending
        return None

    def guard(self, tag_prefix: str, allowed: Callable[[str], bool] | None) -> None:
        if allowed is None:
            self._guards.pop(tag_prefix, None)
        else:
            self._guards[tag_prefix] = allowed

    def _refused_by_guard(self, peer_id: str, tag: str) -> str | None:
        for prefix, allowed in self._guards.items():
            if tag.startswith(prefix):
                try:
                    ok = allowed(peer_id)
                except Exception:  # a guard's bug must not take the channel down
                    log.exception("data plane guard for %r failed", prefix)
                    ok = False
                if not ok:
                    return prefix
        return None

    async def claim(self, peer_id: str, msg_id: int, tag: str, specs: list[BufferSpec]) -> Delivery:
        """Decide where the message ``(peer_id, tag)`` described by ``specs`` lands."""
        guarded = self._refused_by_guard(peer_id, tag) if self._guards else None
        if guarded is not None:
            self._complaints.log(
                log, peer_id, "refusing %r from %s: not admitted to %r", tag, peer_id[-8:], guarded
            )
            return _discarding(f"not admitted to {guarded!r}")
        total = sum(s.nbytes for s in specs)
        pending = self._find_posted(peer_id, tag)
        if pending is None and not self._fits(peer_id, total):
            # Hold the sender back (TCP backpressure) until a receive shows up.
            with trio.move_on_after(self._unsolicited_timeout):
                while pending is None:
                    await self._posted_event.wait()
                    pending = self._find_posted(peer_id, tag)
            if pending is None:
                self._complaints.log(
                    log,
                    peer_id,
                    "refusing %d-byte message %r from %s: nobody received it",
                    total,
                    tag,
                    peer_id[-8:],
                )
                return _discarding(f"no receiver for {tag!r} and over the unsolicited budget")
        if pending is not None:
            return self._deliver_to(pending, peer_id, tag, specs, total)
        return self._deliver_unsolicited(peer_id, tag, specs, total)

    def _deliver_to(
        self, pending: PendingReceive, peer_id: str, tag: str, specs: list[BufferSpec], total: int
    ) -> Delivery:
        if pending.into is None:
            buffers = {spec.name: allocate(spec) for spec in specs}
        else:
            buffers = pending.into
            try:
                if set(buffers) != {spec.name for spec in specs}:
                    raise SpecMismatch(
                        f"message {tag!r} carries {sorted(s.name for s in specs)}, "
                        f"receiver prepared {sorted(buffers)}"
                    )
                for spec in specs:
                    check_matches(spec, describe(spec.name, buffers[spec.name], writable=True)[0])
            except SpecMismatch as exc:
                pending._resolve(None, exc)
                return _discarding(str(exc))
        views = [describe(spec.name, buffers[spec.name], writable=True)[1] for spec in specs]

        def finish(seconds: float, path: str) -> None:
            pending._resolve(Received(peer_id, tag, dict(buffers), total, seconds, path), None)

        return Delivery(views, finish, lambda exc: pending._resolve(None, exc))

    def _deliver_unsolicited(
        self, peer_id: str, tag: str, specs: list[BufferSpec], total: int
    ) -> Delivery:
        buffers = {spec.name: allocate(spec) for spec in specs}
        views = [describe(spec.name, buffers[spec.name], writable=True)[1] for spec in specs]
        self._charge(peer_id, total)
        key = (peer_id, tag)

        def finish(seconds: float, path: str) -> None:
            received = Received(peer_id, tag, buffers, total, seconds, path)
            pending = self._find_posted(peer_id, tag)
            if pending is not None:
                self._release(peer_id, total)
                self._hand_over(pending, received)
            else:
                self._arrived[key].append(received)

        def fail(exc: BaseException) -> None:
            self._release(peer_id, total)
            pending = self._find_posted(peer_id, tag)
            if pending is not None:
                pending._resolve(None, exc)
            else:
                self._complaints.log(
                    log,
                    peer_id,
                    "message %r from %s failed before anyone received it: %s",
                    tag,
                    peer_id[-8:],
                    exc,
                )

        return Delivery(views, finish, fail)


def _discarding(reason: str) -> Delivery:
    return Delivery([], lambda s, p: None, lambda exc: None, discard=True, refusal=reason)
