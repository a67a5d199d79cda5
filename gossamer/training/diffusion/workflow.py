"""A decentralized-diffusion run, end to end: publish, train in isolation, serve, sample.

1. **Publish** (the run's host): :func:`plan_run` fits the partition (PCA + k-means) on the data
   and fixes the hyper-parameters; :func:`publish` writes them into the run document's config
   field ``ddm`` — the recipe as its canonical bytes plus its digest, and a digest of the data
   itself, so a node holding different data finds out before it trains.
2. **Train an expert** (any node, one cluster each): :func:`read_plan` takes the recipe from the
   run document; :func:`cluster_images` applies it to the node's own copy of the data (plain
   float64 arithmetic, identical on every node); :func:`train_cluster_expert` trains with no
   network at all — :func:`fetch_plan` closes the node before training starts — and returns the
   checkpoint bytes, whose sha256 is the expert's content id.
3. **Train the router** (whichever node hosts it, on the whole data or a labelled sample):
   :func:`train_run_router`, capped at ``router_budget`` (5%) of the experts' training FLOPs.
4. **Serve** (:func:`serve_checkpoints`): register the ``ddm`` service, announce every
   checkpoint in the run document and the DHT (``announce``), keep the DHT records fresh.
5. **Sample** (any node): ``discover`` → ``connect_experts`` (verifies every
   announcement) → ``sample_network``; :func:`generate` does all three.

Nothing here opens a socket by itself: the node, the DHT and the run document come from the
caller (:func:`gossamer.crdt.stack.open_stack` builds the usual stack).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import trio
from safetensors.torch import save as st_save

from gossamer.node import GossamerError
from gossamer.training.diffusion.data import ImageSet, load_digits_split, load_image_folder
from gossamer.training.diffusion.experiment import split_steps
from gossamer.training.diffusion.flow import train_expert
from gossamer.training.diffusion.models import ExpertSpec, training_flops
from gossamer.training.diffusion.partition import PartitionRecipe, cluster_sizes, fit_partition
from gossamer.training.diffusion.router import (
    Router,
    router_steps_for_budget,
    router_to_bytes,
    train_router,
)
from gossamer.training.diffusion.serving import DDM_META_KEY, ExpertServer, ServedCheckpoint

if TYPE_CHECKING:
    from gossamer.crdt import Run
    from gossamer.node import Node, NodeConfig

log = logging.getLogger(__name__)

CONFIG_FIELD = "ddm"
PLAN_VERSION = 1


class PlanError(GossamerError, ValueError):
    """The run's ``ddm`` config is missing, malformed, or does not match this node's data."""


@dataclass(frozen=True)
class RunPlan:
    """What every node of a diffusion run must agree on (the run config field ``ddm``)."""

    recipe: PartitionRecipe
    data: dict[str, Any]  # {"kind": "digits", "n_holdout", "seed"} | {"kind": "folder", ...}
    data_digest: str  # sha256 of the training images as float32: same data on every node
    expert: ExpertSpec = field(default_factory=ExpertSpec)
    total_steps: int = 5000  # the experts' steps sum to this (a monolith would take all of it)
    expert_steps: tuple[int, ...] = ()
    batch: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 0
    router_budget: float = 0.05
    router_hidden: int = 128
    router_depth: int = 2
    router_lr: float = 2e-3
    temperature: float = 0.5
    sample_steps: int = 50

    @property
    def k(self) -> int:
        return self.recipe.k

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.recipe.image_shape

    @property
    def partition(self) -> str:
        return self.recipe.digest()

    def to_doc(self) -> dict[str, Any]:
        """The msgpack-ready value of the run config field (the recipe as raw bytes)."""
        return {
            "version": PLAN_VERSION,
            "recipe": self.recipe.to_bytes(),
            "partition": self.partition,
            "data": dict(self.data),
            "data_digest": self.data_digest,
            "expert": self.expert.to_dict(),
            "total_steps": self.total_steps,
            "expert_steps": list(self.expert_steps),
            "batch": self.batch,
            "lr": self.lr,
            "ema_decay": self.ema_decay,
            "seed": self.seed,
            "router": {
                "budget": self.router_budget,
                "hidden": self.router_hidden,
                "depth": self.router_depth,
                "lr": self.router_lr,
            },
            "temperature": self.temperature,
            "sample_steps": self.sample_steps,
        }

    @classmethod
    def from_doc(cls, value: Any) -> RunPlan:
        """Parse and check a ``ddm`` config value from the run document (a peer wrote it)."""
        if not isinstance(value, dict) or value.get("version") != PLAN_VERSION:
            raise PlanError("the run has no ddm plan of a version this node understands")
        try:
            raw = value["recipe"]
            recipe = PartitionRecipe.from_bytes(bytes(raw))
            if recipe.digest() != value["partition"]:
                raise PlanError("the partition recipe does not match its digest")
            router = value.get("router") or {}
            steps = tuple(int(s) for s in value.get("expert_steps") or ())
            plan = cls(
                recipe=recipe,
                data=dict(value["data"]),
                data_digest=str(value["data_digest"]),
                expert=ExpertSpec.from_dict(value["expert"]),
                total_steps=int(value["total_steps"]),
                expert_steps=steps,
                batch=int(value["batch"]),
                lr=float(value["lr"]),
                ema_decay=float(value["ema_decay"]),
                seed=int(value["seed"]),
                router_budget=float(router.get("budget", 0.05)),
                router_hidden=int(router.get("hidden", 128)),
                router_depth=int(router.get("depth", 2)),
                router_lr=float(router.get("lr", 2e-3)),
                temperature=float(value.get("temperature", 0.5)),
                sample_steps=int(value.get("sample_steps", 50)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed ddm plan: {exc}") from None
        if len(plan.expert_steps) != plan.k or min(plan.expert_steps, default=0) < 0:
            raise PlanError("the plan needs one step count per cluster")
        if not 0 < plan.batch <= 1 << 16 or not 0 < plan.total_steps <= 10**9:
            raise PlanError("batch or total_steps out of range")
        return plan


# ------------------------------------------------------------------------------------- data


DIGITS = {"kind": "digits", "n_holdout": 360, "seed": 0}  # the bundled data set, 360 held out


def data_spec(
    folder: str | Path | None = None, size: int = 32, grey: bool = False
) -> dict[str, Any]:
    """The data spec a plan publishes: an image folder (``size``², grey or RGB) or the digits."""
    if folder:
        return {"kind": "folder", "size": size, "mode": "L" if grey else "RGB"}
    return dict(DIGITS)


def data_digest(images: torch.Tensor) -> str:
    """sha256 of the images as contiguous little-endian float32 (the data's identity)."""
    arr = np.ascontiguousarray(images.detach().cpu().numpy(), dtype="<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def load_data(spec: dict[str, Any], folder: str | Path | None = None) -> ImageSet:
    """The training images a plan's data spec names (a folder spec needs this node's path)."""
    kind = spec.get("kind")
    if kind == "digits":
        train, _ = load_digits_split(int(spec.get("n_holdout", 360)), int(spec.get("seed", 0)))
        return train
    if kind == "folder":
        if folder is None:
            raise PlanError("this run trains on an image folder: pass its path (--data)")
        return load_image_folder(folder, int(spec["size"]), str(spec.get("mode", "L")))
    raise PlanError(f"unknown data kind {kind!r}")


def plan_run(
    data: ImageSet,
    data_spec: dict[str, Any],
    *,
    k: int = 4,
    total_steps: int = 5000,
    expert: ExpertSpec | None = None,
    feature_dim: int = 32,
    whiten: bool = True,
    seed: int = 0,
    **hparams: Any,
) -> RunPlan:
    """Fit the partition on ``data`` and split ``total_steps`` over the clusters by size."""
    recipe = fit_partition(data.images, k, feature_dim, whiten, seed=seed)
    sizes = cluster_sizes(recipe.assign(data.images), k)
    return RunPlan(
        recipe=recipe,
        data=dict(data_spec),
        data_digest=data_digest(data.images),
        expert=expert or ExpertSpec(),
        total_steps=total_steps,
        expert_steps=tuple(split_steps(total_steps, sizes)),
        seed=seed,
        **hparams,
    )


def check_data(plan: RunPlan, data: ImageSet) -> None:
    """Refuse to train on data other than the run's (the partition would mean nothing)."""
    if data_digest(data.images) != plan.data_digest:
        raise PlanError("this node's data differs from the run's (data digest mismatch)")


def cluster_images(plan: RunPlan, data: ImageSet, cluster: int) -> torch.Tensor:
    """The images of one cluster, by the published recipe (the same on every node)."""
    if not 0 <= cluster < plan.k:
        raise PlanError(f"cluster must be in 0..{plan.k - 1}")
    return data.images[torch.from_numpy(plan.recipe.assign(data.images) == cluster)]


# ------------------------------------------------------------------------- the run document


async def host_run(node: Node, name: str, plan: RunPlan, router: bytes | None = None) -> Run:
    """Host a diffusion run on ``node``: a run document named ``name`` holding ``plan``, and
    (when given) the router's weights served and announced.  The node needs the stack
    (:func:`gossamer.crdt.stack.attach_stack`): the DHT for the announcements."""
    from gossamer.crdt import CrdtService

    service = await CrdtService.start(node)  # the node's, if it runs one already
    run = await service.host_run(name, config={CONFIG_FIELD: plan.to_doc()})
    if router is not None:
        await serve_checkpoints(node, [], run=run, router=router)
    return run


def publish(run: Run, plan: RunPlan) -> None:
    """Write the plan into the run's config (hosts only)."""
    run.doc.set_config(**{CONFIG_FIELD: plan.to_doc()})


def read_plan(run: Run) -> RunPlan | None:
    """The plan in the run document, or None if the host has not published one (yet)."""
    value = run.doc.config().get(CONFIG_FIELD)
    return None if value is None else RunPlan.from_doc(value)


async def wait_plan(run: Run, timeout: float = 10.0) -> RunPlan:
    """The plan, once the run document has it; PlanError after ``timeout``."""
    try:
        await run.wait_for(lambda doc: doc.config().get(CONFIG_FIELD) is not None, timeout)
    except trio.TooSlowError:
        raise PlanError(f"run {run.run_id} has no ddm plan (waited {timeout:.0f} s)") from None
    plan = read_plan(run)
    assert plan is not None
    return plan


# ----------------------------------------------------------------------------------- training


def checkpoint_bytes(
    model: torch.nn.Module,
    plan: RunPlan,
    cluster: int,
    run_id: str | None,
    steps: int,
) -> bytes:
    """``expert_to_bytes`` plus a ``gossamer_ddm`` metadata entry (cluster, run, partition).

    ``expert_from_bytes`` reads it unchanged; ``serving`` takes the cluster from it.
    """
    spec_meta = {"spec": plan.expert.to_dict(), "image_shape": list(plan.image_shape)}
    ddm_meta = {"cluster": cluster, "run": run_id, "partition": plan.partition, "steps": steps}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(
        state, metadata={"gossamer": json.dumps(spec_meta), DDM_META_KEY: json.dumps(ddm_meta)}
    )


def train_cluster_expert(
    plan: RunPlan,
    data: ImageSet,
    cluster: int,
    *,
    run_id: str | None = None,
    steps: int | None = None,
    on_step: Any = None,
) -> tuple[torch.nn.Module, bytes]:
    """Train cluster ``cluster``'s expert on this node's data, in isolation; (model, bytes).

    Uses no network: call it after the node that fetched the plan has closed.
    """
    check_data(plan, data)
    images = cluster_images(plan, data, cluster)
    n_steps = plan.expert_steps[cluster] if steps is None else steps
    model = train_expert(
        plan.expert,
        images,
        n_steps,
        plan.batch,
        plan.lr,
        seed=1000 * plan.seed + cluster + 1,
        ema_decay=plan.ema_decay,
        on_step=on_step,
    )
    return model, checkpoint_bytes(model, plan, cluster, run_id, n_steps)


def train_monolith(plan: RunPlan, data: ImageSet, steps: int | None = None) -> torch.nn.Module:
    """The FLOP-matched reference: one model of the same architecture on all the data."""
    return train_expert(
        plan.expert,
        data.images,
        plan.total_steps if steps is None else steps,
        plan.batch,
        plan.lr,
        seed=1000 * plan.seed,
        ema_decay=plan.ema_decay,
    )


def router_config(plan: RunPlan) -> dict[str, Any]:
    """The configuration the run's router must have (its safetensors metadata)."""
    return {
        "image_shape": list(plan.image_shape),
        "k": plan.k,
        "hidden": plan.router_hidden,
        "depth": plan.router_depth,
    }


def experts_training_flops(plan: RunPlan) -> int:
    """Counted training FLOPs of all the experts together (sum of steps × batch)."""
    model = plan.expert.build(plan.image_shape)
    return training_flops(model, plan.image_shape, sum(plan.expert_steps) * plan.batch)


def train_run_router(
    plan: RunPlan, data: ImageSet, *, steps: int | None = None
) -> tuple[Router, bytes, dict[str, Any]]:
    """Train the router on ``data`` labelled by the recipe, within the plan's FLOP budget.

    Returns (router, its bytes, {"steps", "flops", "fraction"}): ``fraction`` is its training
    FLOPs over the experts' (≤ ``router_budget`` unless ``steps`` overrides the budget).
    """
    expert_flops = experts_training_flops(plan)
    if steps is None:
        steps = router_steps_for_budget(
            plan.router_budget * expert_flops,
            plan.image_shape,
            plan.k,
            plan.batch,
            plan.router_hidden,
            plan.router_depth,
        )
    steps = max(1, steps)
    assignment = plan.recipe.assign(data.images)
    router = train_router(
        data.images,
        assignment,
        plan.k,
        steps,
        plan.batch,
        plan.router_lr,
        seed=1000 * plan.seed + 999,
        hidden=plan.router_hidden,
        depth=plan.router_depth,
    )
    flops = training_flops(router, plan.image_shape, steps * plan.batch)
    info = {"steps": steps, "flops": flops, "fraction": flops / max(1, expert_flops)}
    return router, router_to_bytes(router), info


# ------------------------------------------------------------------------------- the network


async def join(
    node: Node,
    run_id: str,
    bootstrap: Sequence[str] = (),
    *,
    member: bool = True,
    timeout: float = 10.0,
) -> Run:
    """Join (``member``) or just follow a run through ``bootstrap`` multiaddrs or the DHT."""
    from gossamer.crdt import CrdtService

    service = await CrdtService.start(node, resume=False)  # the node's, if it runs one
    return await service.join_run(
        run_id, bootstrap=list(bootstrap), role="expert", timeout=timeout, join=member
    )


async def fetch_plan(
    config: NodeConfig, run_id: str, bootstrap: Sequence[str], timeout: float = 20.0
) -> RunPlan:
    """Start a node, read the run's plan, stop the node: training then runs with no network."""
    from gossamer.crdt import open_stack

    async with open_stack(config, dht=False) as node:
        run = await join(node, run_id, bootstrap, member=False, timeout=timeout)
        return await wait_plan(run, timeout)


@dataclass
class Serving:
    """What :func:`serve_checkpoints` set up on a node."""

    server: ExpertServer
    entries: list[ServedCheckpoint]
    run: Run | None


async def serve_checkpoints(
    node: Node,
    checkpoints: Sequence[bytes],
    *,
    run: Run | None = None,
    run_id: str | None = None,
    cluster: int | None = None,
    router: bytes | None = None,
    ttl: float = 3600.0,
) -> Serving:
    """Serve expert checkpoints (and a router), announce them, keep the DHT records fresh.

    ``cluster`` overrides the checkpoints' metadata (for plain ``expert_to_bytes`` files).
    Announcements are withdrawn from the run document when the node closes.
    """
    from gossamer.training.diffusion import serving
    from gossamer.training.diffusion.announcements import announce, withdraw

    admits = None
    if run is not None:
        served = run

        def admits(entry_run: str, peer_id: str) -> bool:
            # a run's experts go to the peers its charter admits, read live (revocation)
            return entry_run != served.run_id or served.charter.may_join(peer_id)

    run_id = run_id or (run.run_id if run is not None else None)
    server = serving.serve(node, admits=admits)
    entries = []
    for data in checkpoints:
        entries.append(server.add_expert(data, cluster=cluster, run_id=run_id))
    if router is not None:
        entries.append(server.add_blob(router, "router", run_id))
    partition = next((e.meta.get("partition") for e in entries if e.meta.get("partition")), None)
    await announce(node, entries, run=run, run_id=run_id, partition=partition, ttl=ttl)

    async def refresh() -> None:
        while True:
            await trio.sleep(ttl / 2)
            await announce(node, entries, run=None, run_id=run_id, ttl=ttl)

    node.nursery.start_soon(refresh)
    if run is not None:

        async def withdraw() -> None:
            with contextlib.suppress(Exception):
                withdraw(run, entries)

        node.on_close(withdraw)
    return Serving(server, entries, run)


async def wait_experts(run: Run, k: int, timeout: float, *, router: bool = False) -> None:
    """Until every cluster 0..k-1 (and the router, if asked) has a serving peer."""
    from gossamer.training.diffusion.announcements import ROUTER_SLOT

    def ready(doc: Any) -> bool:
        served = doc.experts()
        return all(c in served for c in range(k)) and (not router or ROUTER_SLOT in served)

    try:
        await run.wait_for(ready, timeout)
    except trio.TooSlowError:
        have = sorted(c for c in run.doc.experts() if c != ROUTER_SLOT)
        raise PlanError(f"only clusters {have} of {k} are served after {timeout:.0f} s") from None


@dataclass
class Generation:
    images: torch.Tensor
    seconds: float
    mode: str
    experts: dict[int, dict[str, Any]]
    refused: dict[str, str]
    missing: list[int]


async def generate(
    node: Node,
    run: Run,
    n: int,
    *,
    mode: str = "top2",
    seed: int = 0,
    steps: int | None = None,
    temperature: float | None = None,
    router: Router | None = None,
    verify: str = "challenge",
    cache_dir: str | Path | None = None,
    wait: float = 10.0,
) -> Generation:
    """Discover the run's experts, verify them, and sample ``n`` images over the network.

    ``mode``: ``top1``, ``top2``…, ``full`` or ``sticky``. The router comes from the run (its
    announced weights, hash-checked) unless one is passed. ``temperature`` defaults to the
    run's for the mixtures and to 1 for sticky (which draws an expert from the router's
    probabilities: sharpening them would skew the draw).
    """
    from gossamer.training.diffusion.announcements import discover
    from gossamer.training.diffusion.async_sampling import mode_arguments, sample_network
    from gossamer.training.diffusion.remote_experts import connect_experts, fetch_router
    from gossamer.training.diffusion.verify import Verifier

    plan = await wait_plan(run, wait)
    with contextlib.suppress(PlanError):
        await wait_experts(run, plan.k, wait, router=router is None)
    found = await discover(node, run.run_id, run=run, partition=plan.partition, k=plan.k)
    verifier = Verifier(node, mode=verify, cache_dir=cache_dir, expected_spec=plan.expert)
    if router is None:
        if found.router is None:
            raise PlanError(f"run {run.run_id} announces no router (pass one)")
        router = await fetch_router(node, found.router, verifier, router_config(plan))
    experts = await connect_experts(node, found, verifier)
    if not experts:
        raise PlanError(f"no expert of run {run.run_id} could be reached and verified")
    routing, sticky = mode_arguments(mode)
    started = time.perf_counter()
    images = await sample_network(
        router,
        experts,
        n,
        steps or plan.sample_steps,
        routing,
        temperature if temperature is not None else 1.0 if mode == "sticky" else plan.temperature,
        seed=seed,
        image_shape=plan.image_shape,
        sticky_from=sticky,
    )
    return Generation(
        images=images,
        seconds=time.perf_counter() - started,
        mode=mode,
        experts={c: e.stats() for c, e in experts.items()},
        refused=dict(verifier.refused),
        missing=[c for c in range(plan.k) if c not in experts],
    )


__all__ = [
    "CONFIG_FIELD",
    "Generation",
    "PlanError",
    "RunPlan",
    "Serving",
    "check_data",
    "checkpoint_bytes",
    "cluster_images",
    "data_digest",
    "experts_training_flops",
    "fetch_plan",
    "generate",
    "join",
    "load_data",
    "plan_run",
    "publish",
    "read_plan",
    "router_config",
    "serve_checkpoints",
    "train_cluster_expert",
    "train_monolith",
    "train_run_router",
    "wait_experts",
    "wait_plan",
]
