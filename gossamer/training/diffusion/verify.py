"""Verifying announcements before a single request goes to the host that made them.

**Verifying.** An announcement is a claim, and the sampler checks it before it sends a single
request to that host (:class:`Verifier`): (1) the host's ``describe`` must list the announced
``cid`` as an expert of the announced cluster; (2) the weights: fetched once per content id (from
that host, or from a local content-addressed cache), their sha256 must equal ``cid`` — else the
announcement is refused; (3) a challenge: a random probe batch (fresh noise, t spread over
[0, 1], seeded from ``os.urandom``) goes through the host's real ``denoise`` path and the answer
must equal the verified weights' own output (to float32 round-off) — so a host that holds the
announced bytes but computes with other weights is refused too. Refused hosts are never used.
(``verify="hash"`` skips the challenge; ``"none"`` trusts announcements, for benchmarks of the
wire alone.) A host that passes once is trusted for the session; periodic re-challenges are not
implemented.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trio

from gossamer.node import GossamerError
from gossamer.training.diffusion.announcements import ExpertRecord
from gossamer.training.diffusion.hosts import ExpertHost
from gossamer.training.diffusion.models import (
    ExpertSpec,
    expert_from_bytes,
    safetensors_metadata,
)
from gossamer.training.diffusion.serving import (
    INLINE_MAX_BYTES,
    content_id,
    describe,
    fetch_checkpoint,
    remote_velocity,
)

if TYPE_CHECKING:
    from gossamer.node import Node

CHALLENGE_ROWS = 8
CHALLENGE_RTOL = 1e-4
CHALLENGE_ATOL = 1e-5


class AnnouncementRefused(GossamerError):
    """A host's announcement did not hold up (wrong hash, other weights, not served)."""


class Verifier:
    """Checks announcements against the weights (see the module docstring) and keeps the
    verified weights per content id (in memory, and under ``cache_dir`` if given)."""

    def __init__(
        self,
        node: Node,
        *,
        mode: str = "challenge",
        cache_dir: str | Path | None = None,
        timeout: float = 30.0,
        expected_spec: ExpertSpec | None = None,
        max_bytes: int = 1 << 30,
    ) -> None:
        if mode not in ("challenge", "hash", "none"):
            raise ValueError("verify mode must be 'challenge', 'hash' or 'none'")
        self.node = node
        self.mode = mode
        # A checkpoint names the architecture we build from it: only the run's is accepted
        # (a hostile spec could ask for a model too big for this machine), and its size is
        # bounded before a byte is downloaded.
        self.expected_spec = expected_spec
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timeout = timeout
        self.weights: dict[str, bytes] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.refused: dict[str, str] = {}  # peer id -> reason

    def add_local(self, data: bytes) -> str:
        """Trust bytes we hold ourselves (e.g. our own checkpoint); returns their cid."""
        cid = content_id(data)
        self.weights[cid] = bytes(data)
        return cid

    def check_spec(self, data: bytes, who: str) -> None:
        """Refuse an expert checkpoint whose architecture is not the run's."""
        if self.expected_spec is None:
            return
        try:
            spec = json.loads(safetensors_metadata(data)["gossamer"])["spec"]
        except (KeyError, TypeError, ValueError):
            raise AnnouncementRefused(f"{who} serves an expert without a readable spec") from None
        if spec != self.expected_spec.to_dict():
            raise AnnouncementRefused(
                f"{who} serves architecture {str(spec)[:80]}; the run uses "
                f"{self.expected_spec.to_dict()}"
            )

    def model(self, cid: str) -> torch.nn.Module:
        """The verified weights of ``cid`` as a module (built once)."""
        if cid not in self._models:
            self._models[cid], _, self._shapes[cid] = expert_from_bytes(self.weights[cid])
        return self._models[cid]

    async def weights_for(self, cid: str, peer_id: str, nbytes: int) -> bytes:
        """The bytes of ``cid``: cached, or fetched from ``peer_id`` and hash-checked."""
        lock = self._locks.setdefault(cid, trio.Lock())
        async with lock:
            if cid in self.weights:
                return self.weights[cid]
            path = self.cache_dir / f"{cid}.safetensors" if self.cache_dir is not None else None
            if path is not None and path.exists():
                data = path.read_bytes()
                if content_id(data) == cid:
                    self.weights[cid] = data
                    return data
            data = await fetch_checkpoint(self.node, peer_id, cid, nbytes, timeout=self.timeout)
            got = content_id(data)
            if got != cid:
                raise AnnouncementRefused(
                    f"{peer_id[-8:]} announced checkpoint {cid[:12]} but serves bytes hashing to "
                    f"{got[:12]}"
                )
            self.weights[cid] = data
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            return data

    async def admit(self, host: ExpertHost, record: ExpertRecord) -> None:
        """Verify ``host`` for ``record``; raises AnnouncementRefused (or a network error)."""
        if self.mode == "none":
            return
        answer = await describe(self.node, host.peer_id, timeout=min(self.timeout, 10.0))
        listed = [
            c for c in answer["checkpoints"] if isinstance(c, dict) and c.get("cid") == record.cid
        ]
        if not listed or listed[0].get("kind") != record.kind:
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} announced {record.kind} {record.cid[:12]} "
                "but does not serve it"
            )
        info = listed[0]
        if record.kind == "expert" and info.get("cluster") not in (None, record.cluster):
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} serves {record.cid[:12]} as cluster {info.get('cluster')}, "
                f"announced as {record.cluster}"
            )
        host.inline_max_bytes = min(
            INLINE_MAX_BYTES, int(answer.get("inline_max_bytes") or INLINE_MAX_BYTES)
        )
        host.max_batch = int(answer.get("max_batch") or 1)
        nbytes = int(info.get("nbytes") or record.nbytes or 0)
        if not 0 < nbytes <= self.max_bytes:
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} describes {record.cid[:12]} as {nbytes} bytes "
                f"(accepted: 1..{self.max_bytes})"
            )
        data = await self.weights_for(record.cid, host.peer_id, nbytes)
        if record.kind == "expert":
            self.check_spec(data, host.peer_id[-8:])
        if self.mode == "challenge" and record.kind == "expert":
            await self._challenge(host, record)

    async def _challenge(self, host: ExpertHost, record: ExpertRecord) -> None:
        model = self.model(record.cid)
        shape = self._shapes[record.cid]
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        rows = min(CHALLENGE_ROWS, max(1, host.max_batch))
        x = torch.randn((rows, *shape), generator=gen)
        t = torch.linspace(0.0, 1.0, rows)
        start = time.perf_counter()
        remote = await remote_velocity(
            self.node,
            host.peer_id,
            record.cid,
            x,
            t,
            timeout=self.timeout,
            inline_max_bytes=host.inline_max_bytes,
        )
        host.latency.observe(time.perf_counter() - start, rows)

        def local() -> torch.Tensor:
            with torch.no_grad():
                return model(x, t)

        expected = await trio.to_thread.run_sync(local)
        if not torch.allclose(remote, expected, rtol=CHALLENGE_RTOL, atol=CHALLENGE_ATOL):
            diff = float((remote - expected).abs().max())
            raise AnnouncementRefused(
                f"{host.peer_id[-8:]} announced {record.cid[:12]} but its answers differ from "
                f"those weights (max |Δv| = {diff:.3g})"
            )
