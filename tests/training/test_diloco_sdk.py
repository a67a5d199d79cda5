"""The SDK: a user's own nn.Module, optimizer, batches and loss join a run in a few lines."""

from __future__ import annotations

import torch
import trio
from torch import nn

import gossamer
from gossamer.training.outer import state_digest

torch.set_num_threads(1)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # every worker builds the same init (or downloads the host's)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.arange(8, dtype=torch.float32) / 8
    while True:
        x = torch.randn(16, 8, generator=g)
        yield x, (x @ w).unsqueeze(1)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


async def test_two_sdk_workers_train_a_user_model(tmp_path):
    def make(i: int) -> gossamer.Worker:
        model = Regressor()
        if i == 1:
            with torch.no_grad():  # a different init: the joiner must take the host's state
                for p in model.parameters():
                    p.add_(0.5)
        return gossamer.Worker(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            batches(i),
            loss_fn,
            config={"inner_steps": 10, "rounds": 4, "codec": "fp16", "min_workers": 2},
            data_dir=tmp_path / f"w{i}",
            listen=["/ip4/127.0.0.1/tcp/0"],
            use_dht=False,
        )

    host, joiner = make(0), make(1)
    results = {}
    ready = trio.Event()

    async def run_host() -> None:
        results[0] = await host.ahost("sdk_test", ready=lambda node, run: ready.set())

    async def run_joiner() -> None:
        await ready.wait()
        results[1] = await joiner.ajoin(host.run_id, [host.addrs[0]])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_host)
            nursery.start_soon(run_joiner)
    a, b = results[0], results[1]
    assert a.final_digest == b.final_digest and a.state.round == 4
    assert [r.digest for r in a.records] == [r.digest for r in b.records]
    assert b.entered_by == ["download"]
    first, last = a.records[0].loss, a.records[-1].loss
    assert last < first  # it learns
    live = {k: v.detach() for k, v in joiner.model.named_parameters()}
    assert state_digest(live) == state_digest(b.state.params)  # the model holds the run's state
