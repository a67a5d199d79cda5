"""Single-process DiLoCo vs data-parallel simulator: same model, same tokens, honest byte counts.

This is what ``gossamer bench diloco`` calls (``run_comparison``). N workers are simulated one after
the other in one process (``run_ddp``/``run_diloco`` call ``torch.set_num_threads(1)``: these
machines are shared), so the result is deterministic for a seed and needs no
network; it answers "how much loss does DiLoCo with codec X and sync interval H cost against
synchronous training, for how many fewer bytes".

Both methods start from the same ``GPT(seed)`` and see exactly the same tokens: worker i's
t-th batch comes from its own shard (``data.worker_shard``) with the generator seeded by
(seed, i), in DiLoCo and in DDP alike.

* **DDP** (the baseline): every step, the n workers' gradients are averaged in fp32 and one AdamW
  step is taken. Computed as one forward/backward over the n workers' batches concatenated,
  which is the same mean gradient (equal batch sizes), faster on one core.
* **DiLoCo**: each worker keeps its own model copy and its own AdamW state (across rounds, as in
  the paper); every H inner steps it computes its pseudo-gradient θ_start − θ_local, encodes it
  with the codec (optionally through error feedback), and every member decodes all n, averages
  them (``outer.weighted_average``, tokens-weighted) and applies the outer Nesterov step. The last
  round is shorter if H does not divide the step budget.
* Inner learning rate for both: linear warm-up then cosine decay to ``min_lr_ratio``·lr, over
  the per-worker step budget.

What the byte counts are (payload bytes one worker *sends*; headers and framing not counted):

* DDP, ring all-reduce of the fp32 gradient, every step: 2·(n−1)/n · 4·P bytes per step.
* DiLoCo with ``none`` (fp32): ring all-reduce of the pseudo-gradient, every round:
  2·(n−1)/n · 4·P bytes per round. fp32 partial sums can travel around a ring.
* DiLoCo with a compressed codec: all-gather of the encoded pseudo-gradients, every round:
  (n−1) · E bytes per round, E = ``EncodedTensor.nbytes`` summed over tensors (codes + scales).
  A ring cannot add 4-bit codes as they travel; it would have to re-quantize at every hop
  (error grows with n) — this simulator does not model that, so it does not claim its bytes.
  For comparison only, ``bytes_per_worker_diloco_if_ring`` reports 2·(n−1)/n · E per round,
  which is what the calibration table in LIBP2P-NOTES.md counted.

``bytes_reduction`` = DDP bytes / DiLoCo bytes; ``loss_ratio`` = DiLoCo eval loss / DDP eval loss.

Measured (Nov 2026, 2-core dev machine shared with other jobs, seed 0, 4 workers, default model
842,496 params, batch 4×128 per worker, S = 300 inner steps per worker = 153,600 tokens each;
``python -m gossamer.training.simulate --workers 4 --steps 300 --H 25 --codecs int4`` then
``... --codecs none --skip-ddp``):

    method               eval loss   ÷ DDP   MB sent per worker    reduction
    DDP (fp32, ring)         2.298   1.000   1,516.5                    1×
    DiLoCo H=25 fp32         2.487   1.082      60.7 (ring)            25×
    DiLoCo H=25 int4         2.472   1.076      15.4 (all-gather)      98×
      (int4 counted as if a ring could carry it:  7.7                 197×)

In line with LIBP2P-NOTES.md's calibration (H=25 trails DDP by 7.0% at S=500 and 5.5% at
S=1,000; 4-bit costs nothing measurable); its byte figures are reproduced exactly when scaled to
S=1,000 (DDP 5,055 MB, fp32 202 MB, int4 25.7 MB counted as a ring). Honestly counted, 4-bit with
an all-gather is a 98× reduction at H=25, not 197×.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gossamer.training.codecs import ErrorFeedback, get_codec
from gossamer.training.data import Corpus, batches, eval_loss, load_corpus, worker_shard
from gossamer.training.model import GPT, GPTConfig
from gossamer.training.outer import (
    Contribution,
    apply_outer_step,
    init_outer_state,
    pseudo_gradient,
    state_digest,
    weighted_average,
)

__all__ = [
    "SimConfig",
    "allgather_bytes",
    "lr_at",
    "ring_allreduce_bytes",
    "run_comparison",
    "run_ddp",
    "run_diloco",
]


@dataclass(frozen=True)
class SimConfig:
    """Everything a comparison depends on (defaults: the calibration setup, shorter)."""

    n_workers: int = 4
    total_steps: int = 300  # inner steps per worker, whole run (= DDP steps; the token budget)
    sync_every: int = 25  # H
    codec: str = "int4"
    error_feedback: bool = False
    batch_size: int = 4  # per worker
    context: int = 128
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    lr: float = 1e-3
    warmup_steps: int | None = None  # None: 5% of total_steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    eval_batches: int = 32
    eval_batch_size: int = 8
    seed: int = 0
    corpus_root: str | None = None  # None: this interpreter's stdlib

    def __post_init__(self) -> None:
        if self.n_workers < 1 or self.total_steps < 1 or self.sync_every < 1:
            raise ValueError("n_workers, total_steps and sync_every must be >= 1")
        get_codec(self.codec)  # fail early on an unknown codec

    @property
    def model(self) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model, context=self.context
        )

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, self.total_steps // 20)


def lr_at(step: int, cfg: SimConfig) -> float:
    """Inner learning rate at 0-based ``step``: linear warm-up, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _as_config(config: SimConfig | Mapping[str, Any]) -> SimConfig:
    if isinstance(config, SimConfig):
        return config
    return SimConfig(**dict(config))


def _streams(cfg: SimConfig, corpus: Corpus) -> list[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    return [
        batches(
            worker_shard(corpus, i, cfg.n_workers),
            cfg.batch_size,
            cfg.context,
            seed=cfg.seed,
            worker=i,
        )
        for i in range(cfg.n_workers)
    ]


def _adamw(model: GPT, cfg: SimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _train_step(
    model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float
) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def ring_allreduce_bytes(payload: int, n: int) -> float:
    """Bytes one worker sends in a ring all-reduce of ``payload`` bytes: 2·(n−1)/n · payload."""
    return 2.0 * (n - 1) / n * payload


def allgather_bytes(payload: int, n: int) -> float:
    """Bytes one worker sends to give its ``payload`` to n−1 others (any all-gather schedule)."""
    return float((n - 1) * payload)


def run_ddp(config: SimConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Synchronous data-parallel baseline: fp32 gradients averaged every step."""
    cfg = _as_config(config)
    torch.set_num_threads(1)
    corpus = load_corpus(cfg.corpus_root)
    model = GPT(cfg.model, seed=cfg.seed)
    opt = _adamw(model, cfg)
    streams = _streams(cfg, corpus)
    t0 = time.perf_counter()
    for step in range(cfg.total_steps):
        xs, ys = zip(*(next(s) for s in streams), strict=True)
        _train_step(model, opt, torch.cat(xs), torch.cat(ys), lr_at(step, cfg))
    seconds = time.perf_counter() - t0
    n_params = model.num_params()
    per_step = ring_allreduce_bytes(4 * n_params, cfg.n_workers)
    return {
        "eval_loss": eval_loss(model, corpus, cfg.eval_batches, cfg.eval_batch_size),
        "bytes_per_worker": per_step * cfg.total_steps,
        "collective": "ring all-reduce of fp32 gradients, every step",
        "n_params": n_params,
        "train_seconds": seconds,
    }


def run_diloco(config: SimConfig | Mapping[str, Any]) -> dict[str, Any]:
    """N DiLoCo workers with the configured codec, H and optional error feedback."""
    cfg = _as_config(config)
    torch.set_num_threads(1)
    corpus = load_corpus(cfg.corpus_root)
    codec = get_codec(cfg.codec)
    n = cfg.n_workers
    global_model = GPT(cfg.model, seed=cfg.seed)
    params = {k: v.detach().clone() for k, v in global_model.named_parameters()}
    outer_state = init_outer_state(params, lr=cfg.outer_lr, momentum=cfg.outer_momentum)
    workers = [GPT(cfg.model, seed=cfg.seed) for _ in range(n)]
    opts = [_adamw(w, cfg) for w in workers]
    feedback = [ErrorFeedback(codec) for _ in range(n)] if cfg.error_feedback else None
    streams = _streams(cfg, corpus)
    peer_ids = [f"worker-{i:04d}" for i in range(n)]

    t0 = time.perf_counter()
    step, rounds, payload_total = 0, 0, 0
    while step < cfg.total_steps:
        h = min(cfg.sync_every, cfg.total_steps - step)
        contributions = []
        for i, (worker, opt) in enumerate(zip(workers, opts, strict=True)):
            with torch.no_grad():
                for name, p in worker.named_parameters():
                    p.copy_(params[name])
            for k in range(h):
                x, y = next(streams[i])
                _train_step(worker, opt, x, y, lr_at(step + k, cfg))
            local = {k: v.detach() for k, v in worker.named_parameters()}
            delta = pseudo_gradient(params, local)
            decoded = {}
            sent = 0
            for name in sorted(delta):
                enc = (
                    feedback[i].encode(name, delta[name]) if feedback else codec.encode(delta[name])
                )
                sent += enc.nbytes
                decoded[name] = codec.decode(enc)  # what every member reconstructs
            if i == 0:
                payload_total += sent
            contributions.append(
                Contribution(peer_ids[i], decoded, h * cfg.batch_size * cfg.context)
            )
        avg = weighted_average(contributions)
        params, outer_state = apply_outer_step(params, avg, outer_state)
        step += h
        rounds += 1
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        for name, p in global_model.named_parameters():
            p.copy_(params[name])
    if codec.name == "none":
        sent_bytes = ring_allreduce_bytes(payload_total, n)
        collective = "ring all-reduce of fp32 pseudo-gradients, every round"
    else:
        sent_bytes = allgather_bytes(payload_total, n)
        collective = f"all-gather of {codec.name}-encoded pseudo-gradients, every round"
    return {
        "eval_loss": eval_loss(global_model, corpus, cfg.eval_batches, cfg.eval_batch_size),
        "bytes_per_worker": sent_bytes,
        "bytes_per_worker_if_ring": ring_allreduce_bytes(payload_total, n),
        "payload_bytes_per_round": payload_total / rounds,
        "collective": collective,
        "rounds": rounds,
        "n_params": global_model.num_params(),
        "digest": state_digest(params, outer_state),
        "train_seconds": seconds,
    }


def run_comparison(config: SimConfig | Mapping[str, Any]) -> dict[str, Any]:
    """DiLoCo (config's codec, H) vs DDP on the same tokens; see the module docstring for units."""
    cfg = _as_config(config)
    ddp = run_ddp(cfg)
    diloco = run_diloco(cfg)
    return _combine(cfg, diloco, ddp)


def _combine(cfg: SimConfig, diloco: dict[str, Any], ddp: dict[str, Any]) -> dict[str, Any]:
    return {
        "eval_loss_diloco": diloco["eval_loss"],
        "eval_loss_ddp": ddp["eval_loss"],
        "loss_ratio": diloco["eval_loss"] / ddp["eval_loss"],
        "bytes_per_worker_diloco": diloco["bytes_per_worker"],
        "bytes_per_worker_ddp": ddp["bytes_per_worker"],
        # undefined (None) for a single worker, which sends nothing either way
        "bytes_reduction": (
            ddp["bytes_per_worker"] / diloco["bytes_per_worker"]
            if diloco["bytes_per_worker"]
            else None
        ),
        "bytes_per_worker_diloco_if_ring": diloco["bytes_per_worker_if_ring"],
        "collective_diloco": diloco["collective"],
        "collective_ddp": ddp["collective"],
        "rounds": diloco["rounds"],
        "n_params": diloco["n_params"],
        "tokens_per_worker": cfg.total_steps * cfg.batch_size * cfg.context,
        "train_seconds_diloco": diloco["train_seconds"],
        "train_seconds_ddp": ddp["train_seconds"],
        "digest_diloco": diloco["digest"],
        "config": dataclasses.asdict(cfg),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m gossamer.training.simulate``: DDP once, then DiLoCo per codec; JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="inner steps per worker")
    ap.add_argument("--H", type=int, default=25, help="inner steps between outer steps")
    ap.add_argument("--codecs", default="int4,none", help="comma-separated codec names")
    ap.add_argument("--error-feedback", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=SimConfig.lr, help="inner (and DDP) peak lr")
    ap.add_argument("--outer-lr", type=float, default=SimConfig.outer_lr)
    ap.add_argument("--outer-momentum", type=float, default=SimConfig.outer_momentum)
    ap.add_argument("--skip-ddp", action="store_true", help="DiLoCo only (no ratios)")
    args = ap.parse_args(argv)
    base = SimConfig(
        n_workers=args.workers,
        total_steps=args.steps,
        sync_every=args.H,
        error_feedback=args.error_feedback,
        seed=args.seed,
        lr=args.lr,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
    )
    ddp = None if args.skip_ddp else run_ddp(base)
    if ddp is not None:
        print(json.dumps({"method": "ddp", **ddp, "config": dataclasses.asdict(base)}), flush=True)
    for name in args.codecs.split(","):
        cfg = dataclasses.replace(base, codec=name.strip())
        diloco = run_diloco(cfg)
        out = _combine(cfg, diloco, ddp) if ddp is not None else {"method": "diloco", **diloco}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
