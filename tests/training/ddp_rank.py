"""One rank of a two-rank DDP member (launched by test_diloco_ddp.py the way torchrun would).

Every rank builds the same model and calls the SDK; rank 0 joins the run over the network, rank 1
only follows rank 0's commands. Each rank prints one JSON line with the digest of its final
parameters (and rank 0 its training result).
"""

from __future__ import annotations

import json
import sys

import torch

import gossamer
from gossamer.training import Recipe, ddp, load_corpus
from gossamer.training.data import batches, worker_shard
from gossamer.training.outer import state_digest

torch.set_num_threads(1)


def main() -> None:
    run_id, bootstrap, data_dir, recipe_json = sys.argv[1:5]
    recipe = Recipe(**json.loads(recipe_json))
    rank = ddp.rank()
    model = recipe.model()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    shard = 1 + rank  # each rank its own data
    stream = batches(
        worker_shard(load_corpus(), shard, recipe.shards),
        recipe.batch_size,
        recipe.context,
        seed=recipe.seed,
        worker=shard,
    )
    worker = gossamer.Worker(
        model,
        opt,
        stream,
        lambda m, batch: m.loss(*batch),
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        use_dht=False,
    )
    result = worker.join(run_id, bootstrap)
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {"rank": rank, "world": ddp.world_size(), "params": state_digest(params)}
    if result is not None:
        out["digests"] = [r.digest for r in result.records]
        out["members"] = [len(r.members) for r in result.records]
        out["tokens"] = [r.tokens for r in result.records]
        out["final"] = state_digest(result.state.params) if result.state else None
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
