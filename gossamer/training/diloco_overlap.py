"""Rounds whose exchanges overlap the inner steps: Streaming DiLoCo and eager updates.

:meth:`DiLoCoWorker.train` hands over to :class:`OverlappedRounds` when the run's ``overlap``
is ``"streaming"`` or ``"eager"``. The inner steps never stop for the network unless an
exchange is still on the wire when its fragment is due again::

    θ_g: the global parameters and outer momentum, bit-identical on every member, per fragment
    θ:   the model's own (local) parameters

    every inner step:
        one inner step on θ
        merge each finished exchange whose τ steps have passed:
            θ_g[p], momentum[p] ← Nesterov outer step(θ_g[p], mean Δ_p)   (same bits everywhere)
            streaming: θ[p] ← α·θ[p] + (1−α)·θ_g[p]
            eager:     θ ← θ + (θ_g − θ̂)          (swap the estimate for the real step)
        when fragment p's offset in the round comes (training/fragments.py):
            wait for fragment p's previous exchange, if still on the wire (the only blocking)
            Δ_p = θ_g[p] − θ[p]; start its all-reduce in the background  (key <run>/<r>/f<p>)
            eager (one fragment, at the round's end): θ ← θ̂ = outer step(θ_g, Δ_est),
                Δ_est = the last round's average with our share replaced by our fresh Δ
        once every fragment of round r is merged, θ_g is S_{r+1}: publish it, check parity,
        record the round and checkpoint it, in the background

The round entries keep their meaning (:mod:`gossamer.training.rounds`): ``(r, syncing)`` when
the last fragment of round r starts its exchange, ``(r+1, training, digest(S_{r+1}))`` once all
of round r's fragments are merged; a member at ``(r, syncing)`` counts as a member of round
r+1's exchanges (``round_members(overlapped=True)``). Late joiners, checkpoints and state sync
see only complete states S_r. A failed exchange or a lost parity check ends the session: the
member re-enters the run (or restarts from the majority's state) like a blocking member does.

A member with a slow link costs the others no inner steps: an exchange it slows down is merged
late (up to H steps after it started), not waited for; only a fragment due again while its
previous exchange is still running blocks, and that bound is what ``bench wan`` measures.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio

from gossamer.training.codecs import ErrorFeedback
from gossamer.training.collective import AllReduceResult, CollectiveError
from gossamer.training.diloco_state import State, flat_pseudo_gradient, unflatten
from gossamer.training.fragments import FragmentSchedule, eager_estimate, mix, partition
from gossamer.training.outer import OuterState, apply_outer_step, state_digest

if TYPE_CHECKING:
    from gossamer.training.diloco import DiLoCoWorker

log = logging.getLogger(__name__)

__all__ = ["OverlappedRounds"]

Tensors = dict[str, torch.Tensor]


class _Restart(Exception):
    """The session must end: re-enter the run (our entry says we failed ``round``)."""

    def __init__(self, round_: int, why: str) -> None:
        super().__init__(why)
        self.round = round_


@dataclass
class _Exchange:
    """One fragment's all-reduce of one round, from its start to its merge."""

    round: int
    fragment: int
    started_at: int  # the session's inner-step count when it started
    tokens: int
    delta: torch.Tensor  # our flat pseudo-gradient Δ_p
    base: Tensors  # θ_g[p] it updates
    buffers: Tensors  # momentum[p] it updates
    estimate: Tensors | None = None  # eager: θ̂, the parameters loaded when it started
    done: trio.Event = field(default_factory=trio.Event)
    result: AllReduceResult | None = None
    params: Tensors | None = None  # θ_g[p] after the outer step
    new_buffers: Tensors | None = None
    error: str | None = None


@dataclass
class _RoundStats:
    """What one round cost this member (its inner steps, and the time it was not in them)."""

    started: float = 0.0
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    inner_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_sent: int = 0
    attempts: int = 0
    members: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    last: AllReduceResult | None = None


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


class OverlappedRounds:
    """One member's rounds in ``overlap = "streaming"`` or ``"eager"`` (see the module doc)."""

    def __init__(self, worker: DiLoCoWorker) -> None:
        self.w = worker
        config = worker.config
        self.mode = config.overlap
        if self.mode not in ("streaming", "eager"):
            raise ValueError(f"not an overlapped mode: {self.mode!r}")
        sizes = {n: p.numel() for n, p in worker.inner.parameters().items()}
        if self.mode == "streaming":
            self.fragments = partition(sizes, config.fragments)
        else:
            self.fragments = (tuple(sorted(sizes)),)
        count = len(self.fragments)
        delay = config.sync_delay if self.mode == "streaming" else 0
        self.schedule = FragmentSchedule(config.inner_steps, count, delay)
        self.alpha = config.merge_alpha
        if count == 1:
            self.feedback: list[ErrorFeedback | None] = [worker.error_feedback]
        else:
            self.feedback = [
                ErrorFeedback(worker.codec) if worker.error_feedback is not None else None
                for _ in range(count)
            ]
        log.info(
            "overlap %s: %d fragment(s) of %s parameters, exchanges start after steps %s",
            self.mode,
            count,
            [sum(sizes[n] for n in f) for f in self.fragments],
            [self.schedule.offset(p) for p in range(count)],
        )

    # ------------------------------------------------------------------ sessions

    async def train(self, state: State | None) -> State | None:
        """Train from the entered ``state`` until the run ends; return the last state."""
        w = self.w
        while state is not None and not w._finished(state.round):
            try:
                state = await self._session(state)
            except _Restart as restart:
                log.warning("round %d: %s", restart.round, restart)
                w._write_entry(restart.round, "failed", None)
                state = await w.enter()
        return state

    async def _session(self, state: State) -> State:
        """Rounds from ``state`` (its parameters are in the model) to the run's end."""
        self.globals: Tensors = dict(state.params)
        self.buffers: Tensors = dict(state.outer.momentum_buffers)
        self.hyper = state.outer
        self.committed = state
        self.pending: dict[int, _Exchange] = {}
        self.staged: dict[int, dict[int, _Exchange]] = {}
        self.stats: dict[int, _RoundStats] = {}
        self.failure: _Restart | None = None
        self.known: tuple[str, ...] = ()  # the members of our last merged exchange
        self.clock = 0  # inner steps taken in this session
        self.tokens_since = [0] * len(self.fragments)
        # eager: the last round's average and our part in it
        self.last_average: torch.Tensor | None = None
        self.last_own: torch.Tensor | None = None
        self.last_weight = 1.0
        restart: _Restart | None = None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                final = await self._rounds(state.round)
            except _Restart as exc:
                restart = exc
                nursery.cancel_scope.cancel()
        if restart is not None:
            raise restart
        return final

    async def _rounds(self, t: int) -> State:
        w = self.w
        h = self.schedule.inner_steps
        done_in_round, last_event = 0, 0.0
        while True:
            if self.failure is not None:
                raise self.failure
            stats = self.stats.setdefault(t, _RoundStats(started=time.perf_counter()))
            begin = time.perf_counter()
            loss, n = await trio.to_thread.run_sync(w.inner.step, t * h + done_in_round)
            now = time.perf_counter()
            stats.inner_seconds += now - begin
            stats.steps += 1
            stats.tokens += n
            stats.losses.append(loss)
            w.tokens_total += n
            self.tokens_since = [x + n for x in self.tokens_since]
            self.clock += 1
            done_in_round += 1
            if now - last_event > 0.5 or done_in_round == 1:
                last_event = now
                w._step_event(t, done_in_round, loss, stats.tokens / max(1e-9, stats.inner_seconds))
            await self._merge_ready()
            for p in self.schedule.starting_after(done_in_round):
                await self._wait_merged(p)
                if p == len(self.fragments) - 1:
                    # S_t is complete now (the last fragment of round t−1 was just merged)
                    w._write_entry(t, "syncing", self.committed.digest)
                await self._start(t, p)
            if done_in_round < h:
                continue
            w._last_inner_seconds = stats.inner_seconds
            if w._finished(t + 1):  # the run's last round: every exchange, then the last state
                for p in range(len(self.fragments)):
                    await self._wait_merged(p)
                stats.wall_seconds = time.perf_counter() - stats.started
                if self.failure is not None:
                    raise self.failure
                return self.committed
            stats.wall_seconds = time.perf_counter() - stats.started
            t, done_in_round = t + 1, 0

    # ------------------------------------------------------------------ exchanges

    async def _start(self, t: int, p: int) -> None:
        """Start fragment ``p``'s exchange of round ``t`` (its previous one is merged)."""
        names = self.fragments[p]
        live = self.w.inner.parameters()
        base = {n: self.globals[n] for n in names}
        delta = await trio.to_thread.run_sync(
            flat_pseudo_gradient, base, {n: live[n] for n in names}
        )
        exchange = _Exchange(
            round=t,
            fragment=p,
            started_at=self.clock,
            tokens=max(1, self.tokens_since[p]),
            delta=delta,
            base=base,
            buffers={n: self.buffers[n] for n in names},
        )
        self.tokens_since[p] = 0
        if self.mode == "eager":
            estimate = eager_estimate(delta, self.last_average, self.last_own, self.last_weight)
            exchange.estimate = await trio.to_thread.run_sync(
                self._outer, base, unflatten(estimate, base), exchange.buffers, t
            )
            await trio.to_thread.run_sync(self.w.inner.load, exchange.estimate)
        self.pending[p] = exchange
        self.nursery.start_soon(self._exchange, exchange)

    def _outer(self, base: Tensors, avg: Tensors, buffers: Tensors, r: int) -> Tensors:
        s = self.hyper
        params, _ = apply_outer_step(
            base, avg, OuterState(s.lr, s.momentum, s.nesterov, r, dict(buffers))
        )
        return params

    async def _exchange(self, ex: _Exchange) -> None:
        w = self.w
        last = ex.fragment == len(self.fragments) - 1
        try:
            result = await w.all_reduce(
                ex.round,
                ex.delta,
                ex.tokens,
                fragment=None if len(self.fragments) == 1 else ex.fragment,
                error_feedback=self.feedback[ex.fragment],
                last_of_round=last,
                known=self.known,
            )
            s = self.hyper
            params, outer = await trio.to_thread.run_sync(
                apply_outer_step,
                ex.base,
                unflatten(result.tensor, ex.base),
                OuterState(s.lr, s.momentum, s.nesterov, ex.round, ex.buffers),
            )
            ex.result, ex.params, ex.new_buffers = result, params, outer.momentum_buffers
        except CollectiveError as exc:
            ex.error = f"dropped from the exchange of fragment {ex.fragment} ({exc}); re-entering"
        finally:
            ex.done.set()

    async def _merge_ready(self) -> None:
        for _, ex in sorted(self.pending.items()):
            if ex.done.is_set() and self.clock - ex.started_at >= self.schedule.sync_delay:
                await self._merge(ex)

    async def _wait_merged(self, p: int) -> None:
        """Merge fragment ``p``'s exchange, waiting for it if it is still on the wire."""
        ex = self.pending.get(p)
        if ex is None:
            return
        await ex.done.wait()
        await self._merge(ex)

    async def _merge(self, ex: _Exchange) -> None:
        del self.pending[ex.fragment]
        if ex.error is not None or ex.result is None or ex.params is None:
            raise _Restart(ex.round, ex.error or "exchange failed")
        assert ex.new_buffers is not None
        live = self.w.inner.parameters()
        new_global = ex.params
        if self.mode == "streaming":
            local = {n: mix(_cpu(live[n]), new_global[n], self.alpha) for n in new_global}
        else:
            assert ex.estimate is not None
            local = {n: _cpu(live[n]) + (new_global[n] - ex.estimate[n]) for n in new_global}
        await trio.to_thread.run_sync(self.w.inner.load, local)
        self.globals.update(new_global)
        self.buffers.update(ex.new_buffers)
        result = ex.result
        self.known = result.members
        if self.mode == "eager":
            self.last_average, self.last_own = result.tensor, ex.delta
            if self.w.me in result.members and result.total_weight > 0:
                self.last_weight = min(1.0, ex.tokens / result.total_weight)
            else:
                self.last_weight = 1.0 / max(1, len(result.members))
        stats = self.stats.setdefault(ex.round, _RoundStats(started=time.perf_counter()))
        stats.bytes_sent += result.bytes_sent
        stats.attempts = max(stats.attempts, result.attempts)
        stats.members |= set(result.members)
        stats.refused.update(result.refused)
        stats.last = result
        staged = self.staged.setdefault(ex.round, {})
        staged[ex.fragment] = ex
        if len(staged) == len(self.fragments):
            await self._commit(ex.round)

    async def _commit(self, r: int) -> None:
        """Every fragment of round ``r`` is merged: S_{r+1} is complete."""
        staged = self.staged.pop(r)
        params: Tensors = {}
        buffers: Tensors = {}
        for ex in staged.values():
            assert ex.params is not None and ex.new_buffers is not None
            params.update(ex.params)
            buffers.update(ex.new_buffers)
        s = self.hyper
        outer = OuterState(s.lr, s.momentum, s.nesterov, r + 1, buffers)
        digest = await trio.to_thread.run_sync(state_digest, params, outer)
        state = State(params, outer, digest)
        self.committed = state
        stats = self.stats.pop(r, _RoundStats())
        await self.w._publish(state)
        self.nursery.start_soon(self._check, r, state, stats)

    async def _check(self, r: int, state: State, stats: _RoundStats) -> None:
        """Parity of S_{r+1}, then the round's record and checkpoint (in the background)."""
        w = self.w
        members = tuple(sorted(stats.members))
        verdict = await w.parity_verdict(state, members)
        if stats.last is not None:
            loss = sum(stats.losses) / len(stats.losses) if stats.losses else math.nan
            wall = stats.wall_seconds or (time.perf_counter() - stats.started)
            w._record(
                r,
                stats.steps,
                stats.tokens,
                loss,
                stats.last,
                stats.inner_seconds,
                max(0.0, wall - stats.inner_seconds),
                state,
                verdict,
                bytes_sent=stats.bytes_sent,
                members=members,
                attempts=stats.attempts,
                refused=stats.refused,
            )
        if verdict.ok:
            await trio.to_thread.run_sync(w._save_checkpoint, state)
            return
        # the others are exchanges ahead of the state we would re-fetch now: entering the run
        # afresh (announce the next round, download its state) meets them again, where
        # restarting this round from the re-fetched state would average alone
        w.refetches += 1
        self.failure = _Restart(state.round, "parity: our state differs from the majority's")
