"""The SDK: bring your own ``nn.Module``, optimizer, data and loss; join a run as a worker.

::

    import gossamer, torch

    model = MyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    worker = gossamer.Worker(model, opt, my_batches(), lambda m, b: m.loss(*b))
    worker.join("RUN_ID", bootstrap="/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW…")
    # or start a run: worker.host("my-run", config={"inner_steps": 100, "codec": "int4"})

A worker is a node of its own (a libp2p host with the data plane, the run document and, when the
DHT is available, a DHT client), plus :class:`gossamer.training.diloco.DiLoCoWorker` running the
model's inner steps. Everyone in a run must build the same model (names and shapes are checked
when state is downloaded); the run's DiLoCo settings come from the host (``hparams.diloco`` in the
run document) and override the joiner's.

Several GPUs in one machine: launch the same script with ``torchrun --nproc-per-node N``; the
model is wrapped in DDP, every rank takes the inner steps, and only rank 0 speaks to the network
(:mod:`gossamer.training.ddp`). CUDA models run their forward pass under bf16 autocast.
Checkpoints (safetensors, digest-verified) go to ``<data_dir>/training/<run id>/``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from gossamer.crdt.admin import RunAdmin
from gossamer.node import GossamerError, NodeConfig, default_data_dir, load_config
from gossamer.node.control import ControlServer
from gossamer.training.diloco import DiLoCoWorker
from gossamer.training.diloco_config import DiLoCoConfig
from gossamer.training.diloco_results import TrainResult
from gossamer.training.inner import InnerLoop, LocalInnerLoop, count_tokens

log = logging.getLogger(__name__)

__all__ = ["Worker", "open_run", "run_config_of"]

CONFIG_WAIT_S = 30.0


def run_config_of(doc: Any) -> DiLoCoConfig | None:
    """The DiLoCo settings the run's hosts published (None until they arrive)."""
    hparams = doc.config().hparams
    values = hparams.get("diloco") if isinstance(hparams, dict) else None
    return None if not isinstance(values, dict) else DiLoCoConfig.from_dict(values)


async def open_run(
    node: Any,
    *,
    host: str | None = None,
    run_id: str | None = None,
    bootstrap: Sequence[str] = (),
    run_config: Mapping[str, Any] | None = None,
    use_dht: bool = True,
    heartbeat_interval: float = 5.0,
    access: str | None = None,
    allow: Sequence[str] | None = None,
    invite: str | None = None,
) -> Any:
    """Start the node's run-document service and host run ``host`` or join ``run_id``.

    Hosting: ``access`` ("open" / "restricted") and ``allow`` (peer ids) set the charter.
    Joining: ``invite`` is a token from the run's creator (:meth:`Worker.invite`)."""
    from gossamer.crdt import SyncOptions, attach_stack

    crdt = await attach_stack(
        node,
        dht=use_dht,
        dht_optional=True,  # the DHT only helps discovery here
        options=SyncOptions(heartbeat_interval=heartbeat_interval),
    )
    assert crdt is not None
    if host is not None:
        return await crdt.host_run(
            host,
            config=dict(run_config or {}),
            access=access,
            allow=None if allow is None else list(allow),
        )
    if run_id is None:
        raise ValueError("give a run name to host or a run id to join")
    return await crdt.join_run(run_id, bootstrap=list(bootstrap), timeout=30.0, invite=invite)


class Worker:
    """Train ``model`` as a DiLoCo worker of a run (see the module docstring).

    ``batches``: an iterator of batches (anything ``loss_fn`` takes; moved to the model's
    device); ``loss_fn(model, batch) -> scalar tensor``; ``tokens_fn(batch) -> int`` weighs a
    member's contribution (default: the first tensor's size); ``lr_schedule(step) -> lr`` sets the
    inner learning rate (optional). ``config``: DiLoCo settings when hosting (a dict or
    :class:`DiLoCoConfig`). ``data_dir`` holds the worker's identity (its peer id) and
    checkpoints; ``listen`` its libp2p addresses.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterator[Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        *,
        config: DiLoCoConfig | Mapping[str, Any] | None = None,
        tokens_fn: Callable[[Any], int] = count_tokens,
        lr_schedule: Callable[[int], float] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        node_config: NodeConfig | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        autocast: bool | None = None,
        use_dht: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.loss_fn = loss_fn
        self.tokens_fn = tokens_fn
        self.lr_schedule = lr_schedule
        if config is None or isinstance(config, DiLoCoConfig):
            self.config = config or DiLoCoConfig()
        else:
            self.config = DiLoCoConfig.from_dict(config)
        if node_config is None:
            node_config = load_config(
                None,
                overrides={
                    "data_dir": Path(data_dir)
                    if data_dir is not None
                    else default_data_dir() / "worker",
                    "listen": list(listen),
                    "dataplane_listen": _dataplane_listen(listen),
                },
            )
        self.node_config = node_config
        self.on_event = on_event
        self.autocast = autocast
        self.use_dht = use_dht
        self.run_id: str | None = None
        self.addrs: list[str] = []

    # -------------------------------------------------------------- blocking entry points

    def host(
        self,
        name: str,
        *,
        extra_config: Mapping[str, Any] | None = None,
        access: str | None = None,
        allow: Sequence[str] | None = None,
    ) -> TrainResult | None:
        """Start run ``name`` (its id is printed in the log and kept in ``self.run_id``) and
        train as its first worker. Returns when the run's rounds are done. ``access``
        ("open"/"restricted") and ``allow`` (peer ids) say who may join; see :meth:`invite`."""
        return trio.run(
            lambda: self.ahost(name, extra_config, ready=_print_ready, access=access, allow=allow)
        )

    def join(
        self, run_id: str, bootstrap: str | Sequence[str] = (), *, invite: str | None = None
    ) -> TrainResult | None:
        """Join run ``run_id`` through ``bootstrap`` multiaddrs (or the DHT) and train
        (``invite``: a token from the run's creator, for a restricted run)."""
        boot = [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)
        return trio.run(lambda: self.ajoin(run_id, boot, ready=_print_ready, invite=invite))

    # -------------------------------------------------------------- admission (the creator)

    def invite(self, run_id: str, *, ttl: float = 24 * 3600.0, uses: int = 1) -> str:
        """An invite token for our run ``run_id`` (works from another thread while
        :meth:`host` trains, or before it starts)."""
        return str(
            RunAdmin(self.node_config.data_dir).invite(run_id, ttl=ttl, uses=uses).answer["invite"]
        )

    def admit(self, run_id: str, peer_id: str) -> None:
        """Let ``peer_id`` into our run (reaches the members at once while we train)."""
        RunAdmin(self.node_config.data_dir).admit(run_id, peer_id)

    def revoke(self, run_id: str, peer_id: str) -> None:
        """Put ``peer_id`` out of our run: every member's services refuse it from then on."""
        RunAdmin(self.node_config.data_dir).revoke(run_id, peer_id)

    # -------------------------------------------------------------- async entry points

    async def ahost(
        self,
        name: str,
        extra_config: Mapping[str, Any] | None = None,
        *,
        ready: Callable[[Any, Any], None] | None = None,
        access: str | None = None,
        allow: Sequence[str] | None = None,
    ) -> TrainResult | None:
        run_config = {**dict(extra_config or {})}
        hparams = dict(run_config.get("hparams") or {})
        hparams["diloco"] = self.config.to_dict()
        run_config["hparams"] = hparams
        return await self._run(
            host=name, run_config=run_config, ready=ready, access=access, allow=allow
        )

    async def ajoin(
        self,
        run_id: str,
        bootstrap: Sequence[str] = (),
        *,
        ready: Callable[[Any, Any], None] | None = None,
        invite: str | None = None,
    ) -> TrainResult | None:
        return await self._run(run_id=run_id, bootstrap=bootstrap, ready=ready, invite=invite)

    async def _run(self, ready: Callable[[Any, Any], None] | None = None, **how: Any) -> Any:
        from gossamer.node import Node
        from gossamer.training import ddp

        rank = ddp.rank()
        inner: InnerLoop
        if ddp.world_size() > 1:
            inner = ddp.DDPInnerLoop(
                self.model,
                self.optimizer,
                self.batches,
                self.loss_fn,
                tokens_fn=self.tokens_fn,
                lr_schedule=self.lr_schedule,
                autocast=self.autocast,
            )
            if rank != 0:
                await trio.to_thread.run_sync(inner.follow)  # type: ignore[attr-defined]
                return None
        else:
            inner = LocalInnerLoop(
                self.model,
                self.optimizer,
                self.batches,
                self.loss_fn,
                tokens_fn=self.tokens_fn,
                lr_schedule=self.lr_schedule,
                autocast=self.autocast,
            )
        try:
            async with Node(self.node_config) as node, trio.open_nursery() as services:
                # the control API in our data dir: how invite/admit/revoke reach us mid-run
                await services.start(
                    ControlServer(
                        node.control_methods, self.node_config.data_dir, peer_id=node.peer_id
                    ).run
                )
                run = await open_run(node, use_dht=self.use_dht, **how)
                self.run_id = run.run_id
                self.addrs = node.addrs()
                log.info("run %s; this worker is %s at %s", run.run_id, node.peer_id, self.addrs)
                config = await self._run_settings(run)
                if ready is not None:
                    ready(node, run)
                worker = DiLoCoWorker(node, run, inner, config, on_event=self.on_event)
                result = await worker.train()
                services.cancel_scope.cancel()
                return result
        finally:
            inner.close()

    async def _run_settings(self, run: Any) -> DiLoCoConfig:
        with trio.move_on_after(CONFIG_WAIT_S):
            while True:
                config = run_config_of(run.doc)
                if config is not None:
                    return config
                await trio.sleep(0.1)
        raise GossamerError(f"run {run.run_id} has no DiLoCo settings (is its host reachable?)")


def _print_ready(node: Any, run: Any) -> None:
    """What a person running a script needs to know: the run id and where to join it."""
    addrs = node.addrs()
    print(f"gossamer: run {run.run_id} (this worker {node.peer_id})", file=sys.stderr)
    if addrs:
        call = f'worker.join("{run.run_id}", bootstrap="{addrs[0]}")'
        print(f"gossamer: other workers join with {call}", file=sys.stderr)


def _dataplane_listen(listen: Sequence[str]) -> str:
    """Bind the data plane on the same interface as the first libp2p listen address."""
    for addr in listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            host = parts[2]
            return f"[{host}]:0" if parts[1] == "ip6" else f"{host}:0"
    return "0.0.0.0:0"
