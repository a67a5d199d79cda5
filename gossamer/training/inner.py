"""The compute side of a DiLoCo member: the inner loop that takes inner steps.

:class:`InnerLoop` is what the worker (:mod:`gossamer.training.diloco`) needs from it;
:class:`LocalInnerLoop` is a model and its optimizer on one device (several GPUs under
torch.distributed: :mod:`gossamer.training.ddp`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch


class InnerLoop(Protocol):
    """The compute side of a member: takes inner steps, holds the live parameters."""

    def step(self, step: int) -> tuple[float, int]:
        """One inner step (``step``: index in the run's schedule); returns (loss, tokens)."""
        ...

    def parameters(self) -> Mapping[str, torch.Tensor]:
        """The live parameters by name (each distinct tensor once)."""
        ...

    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy these parameters into the model: all of them, or some (one fragment's)."""
        ...

    def close(self) -> None: ...


def count_tokens(batch: Any) -> int:
    """Default token count of a batch: the size of its first tensor (inputs)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.numel())
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return int(item.numel())
    raise TypeError("cannot count tokens in this batch: pass tokens_fn=")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class LocalInnerLoop:
    """A model, its inner optimizer, a batch iterator and a loss, on one device.

    ``loss_fn(model, batch) -> scalar tensor``; ``lr_schedule(step) -> lr`` (optional) sets the
    learning rate of every parameter group before each step. On CUDA the forward pass runs
    under bf16 autocast (``autocast=False`` to turn it off); parameters stay fp32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterator[Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        *,
        tokens_fn: Callable[[Any], int] = count_tokens,
        lr_schedule: Callable[[int], float] | None = None,
        autocast: bool | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.loss_fn = loss_fn
        self.tokens_fn = tokens_fn
        self.lr_schedule = lr_schedule
        self._params = dict(model.named_parameters())
        first = next(iter(self._params.values()))
        self.device = first.device
        use_autocast = self.device.type == "cuda" if autocast is None else autocast
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if use_autocast
            else contextlib.nullcontext
        )

    def step(self, step: int) -> tuple[float, int]:
        loss, tokens = self._train_step(step)
        return float(loss), tokens

    def _train_step(self, step: int) -> tuple[torch.Tensor, int]:
        """One optimizer step on the next batch: (detached loss, tokens in the batch)."""
        batch = next(self.batches)
        tokens = self.tokens_fn(batch)
        batch = _to_device(batch, self.device)
        if self.lr_schedule is not None:
            lr = self.lr_schedule(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        with self._autocast():
            loss = self._forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), int(tokens)

    def _forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def parameters(self) -> Mapping[str, torch.Tensor]:
        return self._params

    @torch.no_grad()
    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        unknown = params.keys() - self._params.keys()
        if unknown:
            raise KeyError(f"not parameters of this model: {sorted(unknown)[:5]}")
        for name, t in params.items():
            p = self._params[name]
            p.copy_(t.to(p.device, p.dtype))

    def close(self) -> None:
        return None
