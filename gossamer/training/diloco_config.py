"""The DiLoCo settings of a run, as the host publishes them in the run document (``hparams``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gossamer.node import DeadlinePolicy, typed_fields
from gossamer.training import rounds
from gossamer.training.aggregate import Aggregation
from gossamer.training.codecs import get_codec
from gossamer.training.fragments import FragmentSchedule

OVERLAP_MODES = ("none", "streaming", "eager")


@dataclass(frozen=True)
class DiLoCoConfig:
    """The algorithm's settings; the host publishes them in the run document (``hparams``)."""

    inner_steps: int = 50  # H: the most inner steps a member takes per round
    min_inner_steps: int | None = None  # None: = H. Fewer: close early when others have
    round_seconds: float | None = None  # close a round after this long (once min steps done)
    rounds: int | None = None  # outer steps in the run; None: until stopped
    codec: str = "none"  # none/fp32, fp16, bf16, int8, int4
    error_feedback: bool = True  # carry the codec's error into the next round (lossy codecs)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    min_workers: int = 1  # the host waits for this many members before round 0
    gather_timeout: float = 120.0  # ... but not longer than this (seconds)
    join_timeout: float | None = None  # wait for slower members; None: max(10 s, 2× our round)
    parity_timeout: float = 10.0  # wait this long for the others' digests after an outer step
    heartbeat_max_age: float = 60.0  # a member silent for longer is not counted live
    checkpoint_every: int = 1  # rounds between checkpoints (0: never)
    # how a part's owner reduces contributions (training/aggregate.py)
    aggregate: str = "centered_clip"  # mean, trimmed_mean, centered_clip (bench adversary)
    weights: str = "bounded"  # bounded: a claimed token count is capped; equal: one each
    max_round_tokens: int | None = None  # the recipe's bound on one member's round, if known
    verify_owners: bool = True  # a second member re-reduces every part (2x reduce-scatter bytes)
    clip_iterations: int = 1  # centered_clip: moves from the median start (1: CClip's advice)
    # deadlines of the collective and of state sync: deadline_safety × what the measured links
    # need for the bytes, never under the floor (a first attempt opens channels) nor over the
    # ceiling (also the deadline while a link is not measured yet)
    deadline_floor: float = 10.0
    deadline_ceiling: float = 300.0
    deadline_safety: float = 3.0
    # overlapping the exchange with inner steps (training/diloco_overlap.py): "none" (every
    # member waits for the whole all-reduce), "streaming" (Streaming DiLoCo: fragments
    # exchanged at staggered offsets, merged θ ← α·θ_local + (1−α)·θ_global) or "eager" (the
    # whole exchange overlaps the next round; the outer step is taken at once with our fresh
    # pseudo-gradient and corrected when the average arrives)
    overlap: str = "none"
    fragments: int | None = None  # streaming: P; None: about 3 blocks each (fragments.py)
    sync_delay: int = 1  # streaming: τ, inner steps an exchange overlaps before it is merged
    merge_alpha: float = 0.5  # streaming: α of the merge (0: take the global fragment)

    def __post_init__(self) -> None:
        rounds.RoundPolicy(self.inner_steps, self.min_inner_steps, self.round_seconds)
        get_codec(self.codec)
        self.aggregation  # noqa: B018 (validates aggregate, weights, max_round_tokens)
        if self.rounds is not None and self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        self.deadlines  # noqa: B018 (validates the deadline bounds)
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(
                f"overlap must be one of {', '.join(OVERLAP_MODES)}, not {self.overlap!r}"
            )
        if self.overlap != "none":
            if self.min_inner_steps not in (None, self.inner_steps) or self.round_seconds:
                raise ValueError(
                    f"overlap {self.overlap!r} needs rounds of exactly inner_steps steps "
                    "(no min_inner_steps below it, no round_seconds)"
                )
            FragmentSchedule(self.inner_steps, self.fragments or 1, self.sync_delay)
        if self.fragments is not None and self.fragments < 1:
            raise ValueError("fragments must be >= 1")
        if not 0.0 <= self.merge_alpha < 1.0:
            raise ValueError("merge_alpha must be in [0, 1)")

    @property
    def deadlines(self) -> DeadlinePolicy:
        return DeadlinePolicy(self.deadline_floor, self.deadline_ceiling, self.deadline_safety)

    @property
    def aggregation(self) -> Aggregation:
        return Aggregation(
            rule=self.aggregate,
            weights=self.weights,
            max_weight=None if self.max_round_tokens is None else float(self.max_round_tokens),
            clip_iterations=self.clip_iterations,
            # a streaming member's pseudo-gradient carries its own gap to the global state (the
            # α-merge keeps part of it), so honest ones need not share a direction: measured, an
            # honest member's cosine with the median fell to −0.96 while the others' stayed at
            # +0.94 (a member back from a crash has no gap yet). Norms are still screened and
            # the rule still bounds what one contribution moves.
            direction_screen=self.overlap != "streaming",
        )

    @property
    def policy(self) -> rounds.RoundPolicy:
        return rounds.RoundPolicy(self.inner_steps, self.min_inner_steps, self.round_seconds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], source: str = "the DiLoCo settings"
    ) -> DiLoCoConfig:
        """Settings from a table (a run file's [diloco], the run document's hparams, the SDK);
        a wrong key or type is a ConfigError naming it, a bad value a ValueError."""
        return cls(**typed_fields(cls, values, source))
