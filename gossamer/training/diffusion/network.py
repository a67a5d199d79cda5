"""Experts on the network: announce, discover, verify, and sample routed across peers.

The parts: announcing and discovering (:mod:`.announcements`), verifying an announcement
(:mod:`.verify`), the hosts of a checkpoint and their deadlines (:mod:`.hosts`), and remote
experts with failover (:mod:`.remote_experts`); this module gathers their public names.

**Sampling.** ``sample_network`` (in ``async_sampling``, re-exported here) is the core sampler
with the experts called concurrently: each Euler step evaluates the router locally, sends every
chosen expert one batched request for exactly its rows, and combines the answers weighted by the
router's probabilities with the core's own arithmetic — so remote experts give bit for bit what
local ones give. Modes: ``top1``, ``top2``/``topk``, ``full``, and sticky (``sticky_from``; each
expert then gets one ``integrate`` request for its rows' whole remaining trajectory).
"""

from __future__ import annotations

from gossamer.training.diffusion.announcements import (
    ROUTER_SLOT,
    ExpertRecord,
    RunExperts,
    announce,
    discover,
    experts_from_dht,
    experts_from_doc,
    run_index_key,
    withdraw,
)
from gossamer.training.diffusion.async_sampling import (
    AsyncExpert,
    LocalExpert,
    ensemble_velocity_network,
    mode_arguments,
    sample_network,
)
from gossamer.training.diffusion.hosts import ExpertHost, Latency
from gossamer.training.diffusion.remote_experts import RemoteExpert, connect_experts, fetch_router
from gossamer.training.diffusion.verify import AnnouncementRefused, Verifier

__all__ = [
    "ROUTER_SLOT",
    "AnnouncementRefused",
    "AsyncExpert",
    "ExpertHost",
    "ExpertRecord",
    "Latency",
    "LocalExpert",
    "RemoteExpert",
    "RunExperts",
    "Verifier",
    "announce",
    "connect_experts",
    "discover",
    "ensemble_velocity_network",
    "experts_from_dht",
    "experts_from_doc",
    "fetch_router",
    "mode_arguments",
    "run_index_key",
    "sample_network",
    "withdraw",
]
