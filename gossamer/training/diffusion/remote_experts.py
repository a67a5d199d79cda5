"""Remote experts: verified hosts of one checkpoint behind one callable, with failover.

**Failures.** A :class:`RemoteExpert` has a list of hosts for its content id. A request goes to
the verified host with the lowest smoothed latency, with a deadline derived from that host's
measured latency (``srtt + 4·rttvar``, times a safety factor, scaled by the batch size; the
verification challenge gives the first measurement). A host that is unreachable or answers badly
is marked down; a host that misses its deadline gets a doubled deadline on the retry and is
marked down after three misses in a row. When no host is left, the expert asks the DHT for more
providers of its ``cid`` (bounded by ``fallback_timeout``), gives hosts that went down over 30 s
ago another chance, verifies them, and carries on; if none answers it raises
``ExpertUnavailable`` and the sampler renormalises over the experts that answer (rows that lose
every expert are re-planned over the survivors). Every wait is bounded, so sampling never hangs
on a dead peer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import trio

from gossamer.dht import DHT
from gossamer.node import DeadlineExceeded, GossamerError
from gossamer.training.diffusion.announcements import ExpertRecord, RunExperts
from gossamer.training.diffusion.ensemble import ExpertUnavailable
from gossamer.training.diffusion.hosts import ExpertHost
from gossamer.training.diffusion.models import safetensors_metadata
from gossamer.training.diffusion.router import Router
from gossamer.training.diffusion.serving import remote_integrate, remote_velocity
from gossamer.training.diffusion.verify import AnnouncementRefused, Verifier

if TYPE_CHECKING:
    from gossamer.node import Node

log = logging.getLogger(__name__)


class RemoteExpert:
    """An expert callable ``await expert(x_t, t) -> v`` served by one or more peers.

    Raises ``ExpertUnavailable`` only when no host (known or found in the DHT) answers.
    """

    MAX_MISSES = 3
    REFRESH_INTERVAL_S = 5.0  # at most one DHT lookup for more hosts this often
    RETRY_DOWN_S = 30.0  # a host marked down is tried again after this long

    def __init__(
        self,
        node: Node,
        record: ExpertRecord,
        verifier: Verifier,
        *,
        fallback_timeout: float = 2.0,
        use_dht: bool = True,
    ) -> None:
        self.node = node
        self.record = record
        self.verifier = verifier
        self.hosts: dict[str, ExpertHost] = {
            p: ExpertHost(p) for p in record.hosts if p != node.peer_id
        }
        self.fallback_timeout = fallback_timeout
        self.use_dht = use_dht
        self.fallbacks = 0
        self._last_refresh = -1e9

    @property
    def cid(self) -> str:
        return self.record.cid

    def stats(self) -> dict[str, Any]:
        return {
            "cluster": self.record.cluster,
            "cid": self.cid,
            "fallbacks": self.fallbacks,
            "hosts": [h.stats() for h in self.hosts.values()],
        }

    async def admit_all(self) -> int:
        """Verify every new host concurrently; returns how many are usable."""
        async with trio.open_nursery() as nursery:
            for host in self.hosts.values():
                if host.state == "new":
                    nursery.start_soon(self._admit, host)
        return sum(h.state == "verified" for h in self.hosts.values())

    async def _admit(self, host: ExpertHost) -> None:
        try:
            with trio.fail_after(self.verifier.timeout):
                await self.verifier.admit(host, self.record)
            host.state = "verified"
        except AnnouncementRefused as exc:
            host.state, host.error = "refused", str(exc)
            self.verifier.refused[host.peer_id] = str(exc)
            log.warning("refused announcement: %s", exc)
        except (GossamerError, ValueError, trio.TooSlowError) as exc:
            host.mark_down(f"{type(exc).__name__}: {exc}")
            log.info("expert %d host %s unusable: %s", self.record.cluster, host.peer_id[-8:], exc)

    def _pick(self, tried: dict[str, int]) -> ExpertHost | None:
        usable = [
            h
            for h in self.hosts.values()
            if h.state == "verified" and tried.get(h.peer_id, 0) < (2 if h.misses else 1)
        ]
        if not usable:
            return None
        return min(usable, key=lambda h: (h.latency.srtt or 0.0, h.misses, h.peer_id))

    async def _refresh(self) -> bool:
        """No host is left: retry hosts that went down a while ago, ask the DHT for other
        providers of our cid, and verify whichever are new. True if one became usable."""
        now = trio.current_time()
        if now - self._last_refresh < self.REFRESH_INTERVAL_S:
            return False
        self._last_refresh = now
        for host in self.hosts.values():
            if host.state == "down" and now - host.down_at >= self.RETRY_DOWN_S:
                host.state, host.misses, host.scale = "new", 0, 1.0
        dht = self.node.service(DHT)
        if self.use_dht and dht is not None:
            found = []
            with trio.move_on_after(self.fallback_timeout):
                try:
                    found = await dht.find_providers(self.cid, timeout=self.fallback_timeout)
                except GossamerError as exc:
                    log.info("provider lookup for %s failed: %s", self.cid[:12], exc)
            for provider in found:
                if provider.peer_id not in self.hosts and provider.peer_id != self.node.peer_id:
                    self.hosts[provider.peer_id] = ExpertHost(provider.peer_id)
        if not any(h.state == "new" for h in self.hosts.values()):
            return False
        with trio.move_on_after(self.fallback_timeout + self.verifier.timeout):
            await self.admit_all()
        return any(h.state == "verified" for h in self.hosts.values())

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocities of the rows ``x`` at times ``t`` (one ``denoise`` request)."""

        async def call(host: ExpertHost, timeout: float) -> torch.Tensor:
            return await remote_velocity(
                self.node,
                host.peer_id,
                self.cid,
                x,
                t,
                timeout=timeout,
                inline_max_bytes=host.inline_max_bytes,
            )

        return await self._with_failover(int(x.shape[0]), 1, call)

    async def integrate(self, x: torch.Tensor, start: int, end: int, steps: int) -> torch.Tensor:
        """Rows ``x`` carried from Euler step ``start`` to ``end`` (of ``steps``) by this expert
        alone, in one ``integrate`` request (sticky sampling)."""

        async def call(host: ExpertHost, timeout: float) -> torch.Tensor:
            return await remote_integrate(
                self.node,
                host.peer_id,
                self.cid,
                x,
                start,
                end,
                steps,
                timeout=timeout,
                inline_max_bytes=host.inline_max_bytes,
            )

        return await self._with_failover(int(x.shape[0]), end - start, call)

    async def _with_failover(
        self,
        rows: int,
        units: int,
        call: Callable[[ExpertHost, float], Awaitable[torch.Tensor]],
    ) -> torch.Tensor:
        """Run ``call`` on the best host, failing over to the others (and the DHT's).

        ``units`` is the request's size in single-step requests: the deadline and the latency
        sample scale with it.
        """
        tried: dict[str, int] = {}
        refreshed = False
        while True:
            host = self._pick(tried)
            if host is None:
                if not refreshed and await self._refresh():
                    refreshed = True
                    continue
                raise ExpertUnavailable(
                    f"expert {self.record.cluster} ({self.cid[:12]}): no host answered"
                )
            if tried:
                self.fallbacks += 1
            tried[host.peer_id] = tried.get(host.peer_id, 0) + 1
            deadline = min(
                host.latency.cap * units, host.latency.deadline(rows, host.scale) * units
            )
            start = time.perf_counter()
            try:
                out = await call(host, deadline)
            except DeadlineExceeded as exc:
                host.failures += 1
                host.misses += 1
                host.scale = min(16.0, host.scale * 2)
                host.error = str(exc)
                if host.misses >= self.MAX_MISSES:
                    host.mark_down(str(exc))
                log.info("expert %d on %s: %s", self.record.cluster, host.peer_id[-8:], exc)
                continue
            except (GossamerError, ValueError) as exc:  # unreachable, refused, malformed
                host.failures += 1
                host.mark_down(f"{type(exc).__name__}: {exc}")
                log.warning(
                    "expert %d host %s is down: %s", self.record.cluster, host.peer_id[-8:], exc
                )
                continue
            host.latency.observe((time.perf_counter() - start) / units, rows)
            host.requests += 1
            host.rows += rows * units
            host.misses, host.scale = 0, 1.0
            return out


async def connect_experts(
    node: Node,
    found: RunExperts,
    verifier: Verifier,
    *,
    clusters: Sequence[int] | None = None,
    fallback_timeout: float = 2.0,
    use_dht: bool = True,
) -> dict[int, RemoteExpert]:
    """A verified :class:`RemoteExpert` per cluster that has at least one usable host."""
    wanted = sorted(found.experts) if clusters is None else sorted(clusters)
    experts = {
        c: RemoteExpert(
            node, found.experts[c], verifier, fallback_timeout=fallback_timeout, use_dht=use_dht
        )
        for c in wanted
        if c in found.experts
    }
    async with trio.open_nursery() as nursery:
        for expert in experts.values():
            nursery.start_soon(expert.admit_all)
    usable = {}
    for c, expert in experts.items():
        if any(h.state == "verified" for h in expert.hosts.values()) or await expert._refresh():
            usable[c] = expert
        else:
            log.warning("expert %d: no verified host; sampling without it", c)
    return usable


async def fetch_router(
    node: Node,
    record: ExpertRecord,
    verifier: Verifier,
    expected: Mapping[str, Any] | None = None,
) -> Router:
    """The run's router: its bytes from a host that announced it, hash-checked.

    ``expected`` (the plan's ``{"image_shape", "k", "hidden", "depth"}``) must equal the
    router's own configuration before anything is built from it.
    """
    from gossamer.training.diffusion.router import router_from_bytes

    last: Exception | None = None
    for peer in record.hosts:
        try:
            host = ExpertHost(peer)
            await verifier.admit(host, record)
            data = await verifier.weights_for(record.cid, peer, record.nbytes)
            if expected is not None:
                config = json.loads(safetensors_metadata(data).get("gossamer_router", "null"))
                if config != dict(expected):
                    raise AnnouncementRefused(
                        f"{peer[-8:]} serves a router for {config}; the run's is {dict(expected)}"
                    )
            return router_from_bytes(data)
        except (GossamerError, ValueError, trio.TooSlowError) as exc:
            last = exc
            log.warning("router from %s: %s", peer[-8:], exc)
    raise GossamerError(f"no host served the router {record.cid[:12]}: {last}")
