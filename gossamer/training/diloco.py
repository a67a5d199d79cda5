"""DiLoCo over the network: one member's training loop, readable top to bottom.

Every member of a run runs :meth:`DiLoCoWorker.train`::

    state = enter the run                      (own checkpoint, own fresh model, or download)
    while the run has rounds left:
        inner steps until the round closes     (H steps, or fewer if others closed it first)
        pseudo-gradient  Δ = θ_start − θ_local (flat fp32)
        all-reduce Δ among the round's members (tokens-weighted; compressed; dead peers dropped)
        outer step       θ, momentum ← Nesterov SGD(θ_start, mean Δ)   (same bits everywhere)
        parity           publish digest(θ, momentum) in the run document, compare; re-fetch if off

The network sits behind four calls: the run document (:mod:`gossamer.crdt`: round entries,
heartbeats, metrics), :func:`gossamer.training.collective.all_reduce`,
:func:`gossamer.training.statesync.fetch_state` and the state service that serves our state to
others. The round rules (who is in a round, when it closes, how to enter a run, what parity
means) are pure functions in :mod:`gossamer.training.rounds`; the arithmetic is
:mod:`gossamer.training.outer`. Inner steps run in a worker thread so the node keeps serving
the network meanwhile; the inner loop itself is pluggable (:mod:`gossamer.training.inner`): a
plain model + optimizer or several GPUs under torch.distributed (:mod:`gossamer.training.ddp`).

The shared state — parameters and outer optimizer state, fp32 on the CPU — is the ground truth;
the model (maybe on a GPU) is loaded from it after every outer step. The worker is here; the
settings are in :mod:`gossamer.training.diloco_config`, the state and the flat vectors that move
it in :mod:`gossamer.training.diloco_state`, what a member reports in
:mod:`gossamer.training.diloco_results`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from gossamer.node import GossamerError
from gossamer.training import rounds
from gossamer.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gossamer.training.codecs import ErrorFeedback, get_codec
from gossamer.training.collective import AllReduceResult, CollectiveError, all_reduce
from gossamer.training.collective_schedule import keys_prefix
from gossamer.training.diloco_config import DiLoCoConfig
from gossamer.training.diloco_overlap import OverlappedRounds
from gossamer.training.diloco_results import RoundRecord, TrainResult
from gossamer.training.diloco_state import State, flat_pseudo_gradient, outer_step, unflatten
from gossamer.training.inner import InnerLoop
from gossamer.training.outer import OuterState, init_outer_state
from gossamer.training.standing import Standing
from gossamer.training.statesync import (
    StateService,
    StateSyncError,
    fetch_state,
    layout_of,
    make_snapshot,
)

RECENT_DIGESTS = 4  # rounds of digest history in our round entry (overlap: 2 in flight)

log = logging.getLogger(__name__)

__all__ = ["DiLoCoWorker"]


class DiLoCoWorker:
    """One member of a DiLoCo run: ``await DiLoCoWorker(node, run, inner, config).train()``.

    ``run`` is a :class:`gossamer.crdt.Run` this node already joined (``host_run``/``join_run``).
    ``init_params`` are the parameters a fresh run starts from (default: the model's own);
    ``on_event(dict)`` receives progress (``event``: step, round, state, refused). ``hooks`` is
    for tests (``on_attempt(round, attempt, members)`` inside the all-reduce).
    """

    def __init__(
        self,
        node: Any,
        run: Any,
        inner: InnerLoop,
        config: DiLoCoConfig,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        hooks: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.node = node
        self.run = run
        self.doc = run.doc
        self.me = node.peer_id
        self.inner = inner
        self.config = config
        self.policy = config.policy
        self.codec = get_codec(config.codec)
        self.error_feedback = (
            ErrorFeedback(self.codec)
            if config.error_feedback and self.codec.name != "none"
            else None
        )
        root = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if root is None:
            root = Path(node.config.data_dir) / "training" / run.run_id
        self.checkpoint_path = root / "state.safetensors"
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.hooks = dict(hooks or {})
        self.server = StateService.attach(node)
        self.layout = layout_of(inner.parameters())
        self.standing = Standing()
        # what each exchange taught us of the others' standing, (round, fragment, candidates
        # or None, committed, lone owners): overlapped rounds apply it only once every member
        # has certainly finished that round (see all_reduce)
        self._standing_lessons: list[
            tuple[int, int, list[str] | None, tuple[str, ...], list[str]]
        ] = []
        self.records: list[RoundRecord] = []
        self.entered_by: list[str] = []
        self.bytes_sent = 0
        self.bytes_received_state = 0
        self.refetches = 0
        self.tokens_total = 0
        self._changed = trio.Event()
        self._undo_listener = self.doc.on_change(lambda roots, author: self._changed.set())
        self._last_inner_seconds = 0.0
        self.state_round: int | None = None  # the round of the last state we published
        # (round, digest) of the states we published lately, in our round entry: a member
        # that checks round r's parity after we moved on still compares with us
        self._recent_digests: list[tuple[int, str]] = []
        self._fresh = State.of(*self._fresh_state())

    # ------------------------------------------------------------------ the loop

    @property
    def collective_prefix(self) -> str:
        """Every data-plane tag of this run's all-reduces starts with it (keys are
        ``<run id>/<round>``)."""
        return keys_prefix(self.run.run_id)

    async def train(self) -> TrainResult:
        """Train until the run's last round (or ``should_stop``); return what happened."""
        # the collective's tags take bytes only from peers the charter admits (read live, so a
        # revoked member is cut off mid-run)
        self.node.dataplane.guard(self.collective_prefix, lambda p: self.run.charter.may_join(p))
        try:
            state = await self.enter()
            if self.config.overlap == "none":
                state = await self._train_blocking(state)
            else:
                state = await OverlappedRounds(self).train(state)
            return self._result(state)
        finally:
            self.node.dataplane.guard(self.collective_prefix, None)
            self._undo_listener()

    async def _train_blocking(self, state: State | None) -> State | None:
        """Rounds in which every member waits for the whole all-reduce (``overlap = "none"``)."""
        while state is not None and not self._finished(state.round):
            r = state.round
            # 1. inner steps until the round closes
            steps, tokens, loss, inner_seconds = await self.inner_steps(r)
            if self._behind(r):  # most of the run finished round r without us: catch up
                self._write_entry(r, "failed", None)
                state = await self.enter()
                continue
            sync_start = time.perf_counter()
            self._write_entry(r, "syncing", state.digest)
            # 2. pseudo-gradient: where the inner steps went, sign-flipped like a gradient
            delta = await trio.to_thread.run_sync(
                flat_pseudo_gradient, state.params, self.inner.parameters()
            )
            # 3. all-reduce among the round's members (tokens-weighted mean)
            try:
                result = await self.all_reduce(r, delta, tokens)
            except CollectiveError as exc:
                log.warning("round %d: dropped from the all-reduce (%s); re-entering", r, exc)
                self._write_entry(r, "failed", None)
                state = await self.enter()
                continue
            # 4. outer step: every member adds the same numbers in the same order
            avg = unflatten(result.tensor, state.params)
            state = await trio.to_thread.run_sync(outer_step, state, avg)
            await trio.to_thread.run_sync(self.inner.load, state.params)
            # 5. parity: publish our digest, compare with the others; re-fetch if we diverged
            state, verdict = await self.check_parity(state, result.members)
            self._record(
                r,
                steps,
                tokens,
                loss,
                result,
                inner_seconds,
                time.perf_counter() - sync_start,
                state,
                verdict,
            )
            await trio.to_thread.run_sync(self._save_checkpoint, state)
        return state

    # ------------------------------------------------------------------ entering the run

    async def enter(self) -> State | None:
        """Get the state of the round we can enter (see ``rounds.plan_entry``) and publish it."""
        checkpoint = self._load_checkpoint()
        while True:
            if self.should_stop():
                return None
            entries, live = self._view()
            position = self._position(entries, live)
            plan = rounds.plan_entry(
                position,
                entries.get(self.me),
                is_host=self.doc.is_host(),
                checkpoint_round=None if checkpoint is None else checkpoint.round,
                lead=1 if self.config.overlap == "none" else 2,
            )
            if plan.action == "finished":
                log.info("run %s is finished (round %s)", self.run.run_id[:12], plan.round)
                return None
            if plan.action == "resume" and checkpoint is not None:
                return await self._entered(checkpoint, "checkpoint")
            if plan.action == "gather":
                await self._gather()
                return await self._entered(self._fresh, "fresh")
            if plan.action == "start" and plan.digest is not None:
                state = await self._state_with(plan.digest, plan.holders, checkpoint)
                if state is not None:
                    return state
                await self._wait_doc(1.0)  # the holders may have moved on; look again
                continue
            # announce / wait: say we want round plan.round, then wait for the run to get there
            mine = entries.get(self.me)
            if plan.round is not None and (mine is None or mine.step < plan.round):
                self._write_entry(plan.round, "joined", None)
                # live at once: the others count us in round plan.round's first exchange only
                # if our heartbeat is fresh (an overlapped round starts it a step after the
                # state we are waiting for appears)
                with contextlib.suppress(GossamerError):
                    self.doc.heartbeat()
            await self._wait_doc(1.0)

    async def _state_with(
        self, digest: str, holders: tuple[str, ...], checkpoint: State | None
    ) -> State | None:
        """Our own state if it has ``digest`` (checkpoint, fresh model); else download it."""
        for source, local in (("checkpoint", checkpoint), ("fresh", self._fresh)):
            if local is not None and local.digest == digest:
                return await self._entered(local, source)
        self._learn_addrs(holders)
        try:
            fetched = await fetch_state(
                self.node,
                digest,
                holders,
                expected_layout=self.layout,
                timeout=self._fetch_timeout(holders),
                deadlines=self.config.deadlines,
            )
        except StateSyncError as exc:
            log.warning("state sync of %s failed: %s", digest[:12], exc)
            return None
        self.bytes_received_state += fetched.bytes_received
        self.on_event(
            {
                "event": "state",
                "source": "download",
                "round": fetched.outer.step,
                "bytes": fetched.bytes_received,
                "seconds": round(fetched.seconds, 3),
                "peers": len(fetched.sources),
            }
        )
        return await self._entered(State(fetched.params, fetched.outer, digest), "download")

    async def _entered(self, state: State, source: str) -> State:
        await trio.to_thread.run_sync(self.inner.load, state.params)
        self.entered_by.append(source)
        await self._publish(state)
        if source != "download":
            self.on_event({"event": "state", "source": source, "round": state.round})
        log.info("entering round %d from %s state %s", state.round, source, state.digest[:12])
        return state

    async def _gather(self) -> None:
        """A new run: wait (bounded) until ``min_workers`` members announced round 0."""
        self._write_entry(0, "joined", None)
        deadline = trio.current_time() + self.config.gather_timeout
        while trio.current_time() < deadline:
            entries, live = self._view()
            count = sum(1 for p, e in entries.items() if e.step == 0 and live(p))
            if count >= self.config.min_workers:
                return
            self.on_event({"event": "gather", "members": count, "want": self.config.min_workers})
            await self._wait_doc(min(1.0, max(0.0, deadline - trio.current_time())))
        log.warning("starting with fewer than %d members", self.config.min_workers)

    # ------------------------------------------------------------------ one round

    async def inner_steps(self, r: int) -> tuple[int, int, float, float]:
        """Inner steps of round ``r`` until the round's budget closes it."""
        start = time.perf_counter()
        steps, tokens, losses = 0, 0, []
        last_event = 0.0
        while True:
            elapsed = time.perf_counter() - start
            others = rounds.others_closing(self.doc.round_entries(), r, self.me)
            if self.policy.should_close(steps, elapsed, others):
                break
            index = r * self.policy.inner_steps + steps
            loss, n = await trio.to_thread.run_sync(self.inner.step, index)
            steps, tokens = steps + 1, tokens + n
            losses.append(loss)
            now = time.perf_counter()
            if now - last_event > 0.5 or steps == 1:
                last_event = now
                self._step_event(r, steps, loss, tokens / max(1e-9, now - start))
        seconds = time.perf_counter() - start
        self._last_inner_seconds = seconds
        self.tokens_total += tokens
        return steps, tokens, sum(losses) / len(losses), seconds

    def _step_event(self, r: int, step: int, loss: float, tokens_per_s: float) -> None:
        self.on_event(
            {"event": "step", "round": r, "step": step, "loss": loss, "tokens_per_s": tokens_per_s}
        )

    async def all_reduce(
        self,
        r: int,
        delta: torch.Tensor,
        tokens: int,
        *,
        fragment: int | None = None,
        error_feedback: ErrorFeedback | None = None,
        last_of_round: bool = True,
        known: Collection[str] = (),
    ) -> AllReduceResult:
        """Round ``r``'s all-reduce of ``delta`` (of one ``fragment`` of the model, if given:
        its key is ``<run>/<r>/f<fragment>`` and ``error_feedback`` its own; standing is kept
        once per round, by the round's ``last_of_round`` exchange). ``known``: the members of
        our last exchange, candidates whatever the run document says of them (an overlapped
        round starts its exchanges before the others' new entries reach us)."""
        entries, live = self._view()
        overlapped = self.config.overlap != "none"
        if overlapped:
            self._apply_standing_lessons(before=r - 1)
        still_in = [
            p
            for p in known
            if live(p) and (e := entries.get(p)) is not None and e.status not in ("failed", "done")
        ]
        # peers that kept missing rounds (never contributing, or put out for lying) wait out
        # their back-off instead of costing this round its join deadline (training/standing.py)
        members = [
            p
            for p in sorted(
                {*rounds.round_members(entries, r, self.me, live, overlapped=overlapped), *still_in}
            )
            if p == self.me or not self.standing.skipped(p, r)
        ]
        self._learn_addrs(members)
        wait = self.config.join_timeout
        if wait is None:
            wait = max(10.0, 2.0 * self._last_inner_seconds)
        hook = self.hooks.get("on_attempt")
        key = f"{self.run.run_id}/{r}" if fragment is None else f"{self.run.run_id}/{r}/f{fragment}"
        result = await all_reduce(
            self.node,
            key,
            members,
            delta,
            float(tokens),
            codec=self.codec,
            error_feedback=self.error_feedback if fragment is None else error_feedback,
            join_deadline=trio.current_time() + wait,
            on_attempt=None if hook is None else (lambda a, m: hook(r, a, m)),
            aggregation=self.config.aggregation,
            verify=self.config.verify_owners,
            deadlines=self.config.deadlines,
        )
        if overlapped and len(members) > 1 and result.members == (self.me,):
            # the others averaged this exchange without us (we came too late to its start):
            # alone, our state would drift from theirs; re-enter the run instead
            raise CollectiveError(f"{key}: the others of {len(members) - 1} averaged without us")
        self.standing.note_veterans(result.members)
        lone = [owner for owner, _ in result.lone_exclusions]
        candidates = list(members) if last_of_round else None
        self._standing_lessons.append((r, fragment or 0, candidates, result.members, lone))
        if not overlapped:
            # Overlapped: another member may still have this round's exchange on the wire
            # while we start the next round's; a skip we applied now and it did not yet would
            # split the two candidate lists (each then puts the other out). Every member has
            # finished all of round r's exchanges before it starts any of round r+2's (a
            # fragment's next exchange waits for its last), so there lessons of round r count
            # from round r+2 on (applied at the top of this method).
            self._apply_standing_lessons(before=r + 1)
        for peer, why in result.refused.items():
            log.warning("round %d: refused the contribution of %s: %s", r, peer, why)
            self.on_event({"event": "refused", "round": r, "peer": peer, "reason": why})
        self.bytes_sent += result.bytes_sent
        return result

    def _apply_standing_lessons(self, *, before: int) -> None:
        """Apply the queued standing lessons of rounds < ``before``, in (round, fragment)
        order: the same order on every member that saw the same exchanges."""
        due = sorted(
            (x for x in self._standing_lessons if x[0] < before), key=lambda x: (x[0], x[1])
        )
        self._standing_lessons = [x for x in self._standing_lessons if x[0] >= before]
        for r, _, candidates, committed, lone in due:
            if candidates is not None:
                self.standing.record(r, candidates, committed)
            self.standing.record_lone_exclusions(r, lone)

    async def check_parity(
        self, state: State, members: tuple[str, ...]
    ) -> tuple[State, rounds.ParityVerdict]:
        """Publish our digest for round state.round; compare with the members' (bounded wait);
        re-fetch the majority's state into the model if ours differs."""
        await self._publish(state)
        verdict = await self.parity_verdict(state, members)
        if verdict.ok:
            return state, verdict
        fixed = await self.refetch(state.round, verdict)
        if fixed is None:
            self._write_entry(state.round, "failed", None)
            again = await self.enter()
            return (again if again is not None else state), verdict
        await trio.to_thread.run_sync(self.inner.load, fixed.params)
        await self._publish(fixed)
        self.on_event({"event": "state", "source": "refetch", "round": state.round})
        return fixed, verdict

    async def parity_verdict(self, state: State, members: tuple[str, ...]) -> rounds.ParityVerdict:
        """Compare the digest of ``state`` (published already) with ``members``' digests of
        its round (waiting a bounded time for them)."""
        r = state.round
        deadline = trio.current_time() + self.config.parity_timeout
        while trio.current_time() < deadline:
            entries, live = self._view()
            if not rounds.parity_pending(entries, r, [p for p in members if p != self.me], live):
                break
            await self._wait_doc(max(0.0, deadline - trio.current_time()))
        entries, live = self._view()
        digests = rounds.parity_digests(entries, r, self._counted(live))
        if len(digests.keys() - {self.me}) == 0:
            digests = rounds.parity_digests(entries, r, live)
        verdict = rounds.parity(self.me, state.digest, digests)
        unheard = [p for p in members if p not in digests and p != self.me]
        if unheard:
            log.info(
                "parity of round %d: compared %d digests; none from %s",
                r,
                verdict.compared,
                {
                    p[-8:]: (e.step, e.status, live(p)) if (e := entries.get(p)) else None
                    for p in unheard
                },
            )
        if not verdict.ok:
            log.warning(
                "parity: our state %s differs from the majority's %s (%d of %d); re-fetching",
                state.digest[:12],
                verdict.digest[:12],
                len(verdict.holders),
                verdict.compared,
            )
        return verdict

    async def refetch(self, r: int, verdict: rounds.ParityVerdict) -> State | None:
        """The majority's state of round ``r`` from its holders (None: it could not be had)."""
        self.refetches += 1
        self._learn_addrs(verdict.holders)
        try:
            fetched = await fetch_state(
                self.node,
                verdict.digest,
                verdict.holders,
                expected_layout=self.layout,
                timeout=self._fetch_timeout(verdict.holders),
                deadlines=self.config.deadlines,
            )
        except StateSyncError as exc:
            log.warning("parity re-fetch of round %d failed (%s); re-entering the run", r, exc)
            return None
        self.bytes_received_state += fetched.bytes_received
        return State(fetched.params, fetched.outer, verdict.digest)

    # ------------------------------------------------------------------ helpers

    def _behind(self, r: int) -> bool:
        entries, live = self._view()
        position = self._position(entries, live)
        if position.round is None or position.round <= r:
            return False
        log.warning("round %d: the run is at round %d already; re-entering", r, position.round)
        return True

    def _finished(self, r: int) -> bool:
        return (self.config.rounds is not None and r >= self.config.rounds) or self.should_stop()

    def _fresh_state(self) -> tuple[dict[str, torch.Tensor], OuterState]:
        params = {
            n: p.detach().to("cpu", torch.float32).clone()
            for n, p in self.inner.parameters().items()
        }
        outer = init_outer_state(
            params, lr=self.config.outer_lr, momentum=self.config.outer_momentum
        )
        return params, outer

    async def _publish(self, state: State) -> None:
        """Serve ``state`` and declare it in the run document (training, or done at the end)."""
        snapshot = await trio.to_thread.run_sync(
            make_snapshot, state.params, state.outer, state.digest
        )
        self.server.publish(snapshot)
        self.state_round = state.round
        kept = [x for x in self._recent_digests if x[0] != state.round]
        self._recent_digests = [*kept[-(RECENT_DIGESTS - 1) :], (state.round, state.digest)]
        done = self.config.rounds is not None and state.round >= self.config.rounds
        self._write_entry(state.round, "done" if done else "training", state.digest)
        with contextlib.suppress(GossamerError):
            self.doc.heartbeat()

    def _write_entry(self, step: int, status: str, digest: str | None) -> None:
        try:
            self.doc.enter_round(
                step, status, hash=digest, tokens=self.tokens_total, recent=self._recent_digests
            )
        except GossamerError as exc:  # e.g. a forward-only rule after a restart
            log.info("could not write round entry (%d, %s): %s", step, status, exc)

    def _view(self) -> tuple[dict[str, Any], Callable[[str], bool]]:
        entries = self.doc.round_entries()
        members = self.doc.members()
        now = time.time()
        max_age = self.config.heartbeat_max_age

        charter = self.run.charter

        def live(peer: str) -> bool:
            if peer == self.me:
                return True
            if not charter.may_join(peer):  # revoked, or never admitted to a restricted run
                return False
            m = members.get(peer)
            return m is not None and m.heartbeat is not None and now - m.heartbeat <= max_age

        return entries, live

    def _counted(self, live: Callable[[str], bool]) -> Callable[[str], bool]:
        """Live peers with a say in majorities: us, the charter's hosts and allowed peers, and
        the veterans of rounds we committed (never a peer id someone just made up)."""
        charter = self.run.charter

        def counted(peer: str) -> bool:
            if not live(peer):
                return False
            return (
                peer == self.me
                or charter.is_host(peer)
                or peer in charter.allow
                or self.standing.is_veteran(peer)
            )

        return counted

    def _position(self, entries: Any, live: Callable[[str], bool]) -> rounds.RunPosition:
        """The run's position by the counted peers; by every live one when none of those holds
        state (a newcomer whose host has left knows no veteran yet)."""
        position = rounds.run_position(entries, self._counted(live))
        if position.round is None:
            position = rounds.run_position(entries, live)
        return position

    async def _wait_doc(self, timeout: float) -> None:
        """Until the run document changes (or ``timeout`` passes). Several tasks may wait at
        once (an overlapped round's parity check beside the next round's): they share the
        event until a change sets it."""
        if self._changed.is_set():
            self._changed = trio.Event()
        event = self._changed
        with trio.move_on_after(timeout):
            await event.wait()

    def _learn_addrs(self, peers: Any) -> None:
        members = self.doc.members()
        for p in peers:
            m = members.get(p)
            if p != self.me and m is not None and m.addrs:
                self.node.peers.add_addrs(p, list(m.addrs))

    def _fetch_timeout(self, holders: Sequence[str]) -> float:
        """The whole state (params + momentum, fp32) from the fastest measured holder; the
        ceiling when no link to a holder is measured (a late joiner's first fetch)."""
        nbytes = 8 * sum(math.prod(s) for _, s in self.layout)
        links = self.node.dataplane.links
        known = [e for h in holders if (e := links.seconds_for(h, nbytes)) is not None]
        return self.config.deadlines.deadline(min(known) if known else None)

    def _load_checkpoint(self) -> State | None:
        if not self.checkpoint_path.exists():
            return None
        try:
            ck = load_checkpoint(self.checkpoint_path)
        except CheckpointError as exc:
            log.warning("ignoring checkpoint: %s", exc)
            return None
        if layout_of(ck.params) != self.layout:
            log.warning("ignoring checkpoint %s: it does not fit this model", self.checkpoint_path)
            return None
        return State(ck.params, ck.outer_state, ck.digest)

    def _save_checkpoint(self, state: State) -> None:
        every = self.config.checkpoint_every
        if every <= 0 or state.round % every:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.checkpoint_path,
            state.params,
            state.outer,
            round=state.round,
            metadata={"run_id": self.run.run_id},
        )

    def _record(
        self,
        r: int,
        steps: int,
        tokens: int,
        loss: float,
        result: AllReduceResult,
        inner_seconds: float,
        sync_seconds: float,
        state: State,
        verdict: rounds.ParityVerdict,
        *,
        bytes_sent: int | None = None,
        members: tuple[str, ...] | None = None,
        attempts: int | None = None,
        refused: Mapping[str, str] | None = None,
    ) -> None:
        """Record round ``r`` (the overrides: an overlapped round's totals over its
        fragments' exchanges, ``result`` being the last of them)."""
        record = RoundRecord(
            round=r,
            steps=steps,
            tokens=tokens,
            loss=loss,
            members=result.members if members is None else members,
            attempts=result.attempts if attempts is None else attempts,
            bytes_sent=result.bytes_sent if bytes_sent is None else bytes_sent,
            seconds_inner=inner_seconds,
            seconds_sync=sync_seconds,
            digest=state.digest,
            parity_ok=verdict.ok,
            parity_compared=verdict.compared,
            refused=dict(result.refused if refused is None else refused),
        )
        self.records.append(record)
        with contextlib.suppress(GossamerError):
            self.doc.report_metrics(
                step=r + 1,
                loss=loss if math.isfinite(loss) else None,
                tokens=self.tokens_total,
                bytes_sent=self.bytes_sent,
                tokens_per_s=tokens / max(1e-9, inner_seconds),
            )
        self.on_event(
            {
                "event": "round",
                "round": r,
                "steps": steps,
                "tokens": tokens,
                "loss": loss,
                "members": len(record.members),
                "attempts": record.attempts,
                "bytes_sent": record.bytes_sent,
                "bytes_sent_total": self.bytes_sent,
                "tokens_per_s": tokens / max(1e-9, inner_seconds),
                "seconds_inner": round(inner_seconds, 3),
                "seconds_sync": round(record.seconds_sync, 3),
                "digest": state.digest,
                "parity_ok": verdict.ok,
                "parity_compared": verdict.compared,
            }
        )

    def _result(self, state: State | None) -> TrainResult:
        return TrainResult(
            run_id=self.run.run_id,
            peer_id=self.me,
            records=self.records,
            state=state,
            entered_by=self.entered_by,
            bytes_sent_collective=self.bytes_sent,
            bytes_received_state=self.bytes_received_state,
            refetches=self.refetches,
        )
