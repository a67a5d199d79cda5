"""Several GPUs (or CPU processes) in one member: inner steps under torch.distributed + DDP.

Launch the worker script with ``torchrun --nproc-per-node N script.py``. Every rank builds the
same model and calls the SDK as usual (:class:`gossamer.Worker`); the SDK notices the process
group (or torchrun's ``RANK``/``WORLD_SIZE``) and:

* wraps the model in ``DistributedDataParallel``, so each inner step averages the ranks'
  gradients and all ranks keep identical parameters;
* lets only rank 0 start a node and speak to the network; ranks ≥ 1 run :meth:`follow`, a loop
  that obeys rank 0's commands, broadcast over the process group:

  ``STEP i`` take inner step i (DDP all-reduces the gradients), ``LOAD`` receive the agreed
  parameters after an outer step (broadcast from rank 0), ``STOP`` return.

To the network the member is one worker whose tokens per step are the sum over its ranks (its
contribution is weighted accordingly). The backend is NCCL on CUDA and gloo on CPU (which is what
the tests use, with two local ranks).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gossamer.training.inner import LocalInnerLoop, count_tokens

__all__ = ["DDPInnerLoop", "init_process_group", "rank", "world_size"]

STEP, LOAD, STOP = 1.0, 2.0, 3.0
# Ranks >= 1 wait on rank 0 while it talks to the network (gathering peers, all-reduce,
# downloading state): the process group must tolerate long silences.
GROUP_TIMEOUT = datetime.timedelta(hours=6)


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_process_group() -> None:
    """Join the process group torchrun described in the environment (once)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=GROUP_TIMEOUT)


class _LossModule(nn.Module):
    """DDP synchronises gradients of what runs inside its forward: run the user's loss there."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class DDPInnerLoop(LocalInnerLoop):
    """The inner loop of one member spread over the ranks of a process group."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterator[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        tokens_fn: Callable[[Any], int] = count_tokens,
        lr_schedule: Callable[[int], float] | None = None,
        autocast: bool | None = None,
    ) -> None:
        init_process_group()
        super().__init__(
            model,
            optimizer,
            batches,
            loss_fn,
            tokens_fn=tokens_fn,
            lr_schedule=lr_schedule,
            autocast=autocast,
        )
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters here: every rank starts identical.
        self.ddp = nn.parallel.DistributedDataParallel(_LossModule(model, loss_fn), device_ids=ids)
        self._closed = False

    def _command(self, op: float = 0.0, arg: float = 0.0) -> tuple[float, float]:
        cmd = torch.tensor([op, arg], dtype=torch.float64)
        dist.broadcast(cmd, src=0)
        return float(cmd[0]), float(cmd[1])

    def _forward(self, batch: Any) -> torch.Tensor:
        return self.ddp(batch)  # the backward pass then averages the gradients across ranks

    def _step(self, step: int) -> tuple[float, int]:
        loss, tokens = self._train_step(step)
        totals = torch.tensor([float(loss), float(tokens)], dtype=torch.float64)
        dist.all_reduce(totals)
        return float(totals[0]) / dist.get_world_size(), int(totals[1])

    # rank 0: the InnerLoop interface

    def step(self, step: int) -> tuple[float, int]:
        self._command(STEP, float(step))
        return self._step(step)

    @torch.no_grad()
    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        super().load(params)
        self._command(LOAD)
        self._broadcast_params()

    def close(self) -> None:
        if rank() == 0 and not self._closed and dist.is_initialized():
            self._closed = True
            self._command(STOP)

    # ranks >= 1

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        for name in sorted(self._params):
            dist.broadcast(self._params[name].data, src=0)

    def follow(self) -> None:
        """Obey rank 0 until it says STOP (ranks ≥ 1 call this instead of training)."""
        while True:
            op, arg = self._command()
            if op == STEP:
                with torch.enable_grad():
                    self._step(int(arg))
            elif op == LOAD:
                self._broadcast_params()
            elif op == STOP:
                return
            else:
                raise RuntimeError(f"unknown command {op} from rank 0")
