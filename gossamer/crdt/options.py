"""The tunables of run replication (mesh size, timers, deadlines, queue and size limits).

One dataclass shared by the service, its runs and their links, so a test or a
benchmark can shrink every interval in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gossamer.crdt.replica import Limits


@dataclass
class SyncOptions:
    mesh_low: int = 4
    mesh_high: int = 8
    anti_entropy_interval: float = 10.0
    heartbeat_interval: float = 30.0  # 0: no automatic heartbeats
    maintain_interval: float = 1.0
    hello_timeout: float = 5.0
    keepalive: float = 15.0
    idle_timeout: float = 60.0
    write_timeout: float = 10.0
    send_queue_bytes: int = 256 << 20
    checkpoint_every: int = 128
    lazy_push_bytes: int = 64 << 10  # larger envelopes are announced, then pulled
    pull_timeout: float = 5.0
    gap_request_interval: float = 0.5
    ban_seconds: float = 600.0
    dial_backoff: float = 5.0
    stale_member_s: float = 300.0
    limits: Limits = field(default_factory=Limits)

    @property
    def max_frame_bytes(self) -> int:
        return self.limits.max_update_bytes + 4096
