"""The built-in recipe: the byte-level GPT on the Python stdlib corpus, as a run publishes it.

``gossamer run host --config run.toml``, ``gossamer demo`` and the benchmarks train this; a run
document carries it in its ``model`` and ``data`` config fields (plain dicts), so a joiner
rebuilds exactly the same model and data pipeline from the document alone. The inner learning
rate follows :func:`gossamer.training.simulate.lr_at` (warm-up, cosine) over the run's
``rounds × inner_steps`` steps, and worker ``shard`` of ``shards`` draws its batches exactly as
worker ``shard`` does in :mod:`gossamer.training.simulate` — so a network run and the simulator's
data-parallel baseline see the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gossamer.node import typed_fields
from gossamer.training.data import batches, eval_loss, load_corpus, worker_shard
from gossamer.training.inner import LocalInnerLoop
from gossamer.training.model import GPT, GPTConfig
from gossamer.training.simulate import SimConfig, lr_at

__all__ = ["Recipe"]


MODEL_KEYS = (
    "n_layer",
    "n_head",
    "d_model",
    "context",
    "seed",
)  # the [model] table; the rest is [data]


@dataclass(frozen=True)
class Recipe:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    seed: int = 0
    batch_size: int = 4  # per worker and step
    lr: float = 1e-3
    warmup_steps: int | None = None  # None: 5% of the schedule
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    schedule_steps: int = 1000  # inner steps the lr schedule spans (rounds × H)
    shards: int = 4  # the train stream is cut into this many disjoint shards
    corpus_root: str | None = None  # None: this interpreter's stdlib

    @property
    def gpt(self) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model, context=self.context
        )

    def sim_config(self, n_workers: int | None = None, **changes: Any) -> SimConfig:
        """The simulator's config for the same model, data and schedule."""
        base = SimConfig(
            n_workers=n_workers or self.shards,
            total_steps=self.schedule_steps,
            batch_size=self.batch_size,
            context=self.context,
            n_layer=self.n_layer,
            d_model=self.d_model,
            n_head=self.n_head,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            seed=self.seed,
            corpus_root=self.corpus_root,
        )
        return dataclasses.replace(base, **changes)

    # the run document's config fields

    def to_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        model = {k: d.pop(k) for k in MODEL_KEYS}
        return {"model": {"kind": "gpt", **model}, "data": {"kind": "stdlib", **d}}

    @classmethod
    def from_config(cls, model: Mapping[str, Any] | None, data: Mapping[str, Any] | None) -> Recipe:
        if not isinstance(model, Mapping) or model.get("kind") != "gpt":
            raise ValueError("this run does not use the built-in GPT model")
        if not isinstance(data, Mapping) or data.get("kind") != "stdlib":
            raise ValueError("this run does not use the built-in stdlib corpus")
        values = {k: v for k, v in {**model, **data}.items() if k != "kind"}
        return cls(**typed_fields(cls, values, "the run's model/data config"))

    # building a worker

    def model(self) -> GPT:
        return GPT(self.gpt, seed=self.seed)

    def inner_loop(self, shard: int, model: GPT | None = None) -> LocalInnerLoop:
        """Model, AdamW, the shard's batches and the schedule, for worker ``shard``."""
        torch.set_num_threads(1)
        corpus = load_corpus(self.corpus_root)
        model = model if model is not None else self.model()
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        stream = batches(
            worker_shard(corpus, shard % self.shards, self.shards),
            self.batch_size,
            self.context,
            seed=self.seed,
            worker=shard % self.shards,
        )
        sim = self.sim_config()
        return LocalInnerLoop(
            model,
            opt,
            stream,
            lambda m, batch: m.loss(*batch),
            lr_schedule=lambda step: lr_at(min(step, sim.total_steps - 1), sim),
        )

    def eval_loss(self, params: Mapping[str, torch.Tensor], n_batches: int = 32) -> float:
        """Held-out loss (nats per byte) of ``params`` on the eval files."""
        model = self.model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        return eval_loss(model, load_corpus(self.corpus_root), n_batches, 8)
