"""One training step, the same for the loop and for `cratemae bench` (MAE's `train_one_epoch`
body): the scheduled learning rate, `accum` micro-batches with DDP's exchange on the last
only, the loss at the step's precision, a skip when any rank's loss is not finite, gradient
clipping, the optimizer and the weight average.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cratemae.distributed import dist
from cratemae.distributed.precision import Precision
from cratemae.train.ema import WeightEMA
from cratemae.train.state import TrainState
from cratemae.train.task import Task

__all__ = ["StepCounts", "TrainStep", "wrap_model"]

log = logging.getLogger("cratemae")


@dataclass
class StepCounts:
    """What happened on this rank since the last log line."""

    losses: list[torch.Tensor] = field(default_factory=list)
    images: int = 0
    bad: int = 0
    steps: int = 0
    wait: float = 0.0  # seconds spent waiting for the data
    seconds: float = 0.0
    lr: float = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def wrap_model(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """The module the step calls: DDP when there are several ranks, compiled if asked."""
    if dist.get_dist_info().world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


class TrainStep:
    """`step(batches, state, counts)`: one optimizer step of `task`'s loss over `accum`
    micro-batches taken from `batches`; `lr(step)` gives the scheduled learning rate (each
    group's `lr_scale` and the run's `state.lr_factor` multiply it)."""

    def __init__(self, task: Task, *, optimizer: torch.optim.Optimizer, precision: Precision,
                 lr: Callable[[int], float], accum: int = 1, clip_grad: float | None = None,
                 ema: WeightEMA | None = None, compile: bool = False,
                 device: torch.device | None = None) -> None:
        self.task, self.model, self.optimizer = task, task.model, optimizer
        self.precision, self.lr, self.accum = precision, lr, accum
        self.clip_grad, self.ema = clip_grad, ema
        self.world_size = dist.get_dist_info().world_size
        self.device = device or dist.get_dist_info().device
        self.scaler = precision.make_scaler()
        self.forward_model = wrap_model(self.model, self.device, compile)

    def step(self, batches: Iterator[Any], state: TrainState,
             counts: StepCounts | None = None) -> bool:
        """Advance `state` by one step (and `accum` micro-batches); False if the step was
        skipped because some rank's loss was not finite (then no rank runs backward)."""
        counts = counts if counts is not None else StepCounts()
        lr = self.lr(state.step) * state.lr_factor  # lowered by recoveries from NaNs
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        start, finite, losses = time.perf_counter(), True, []
        for i in range(self.accum):
            wait = time.perf_counter()
            batch = next(batches)
            counts.wait += time.perf_counter() - wait
            state.batch += 1
            counts.bad += batch.bad
            counts.images += batch.images.shape[0]
            if not finite:
                continue  # keep the data position in step with every other rank
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else (
                self.forward_model.no_sync())
            # DDP's own collectives (buffers in forward, gradients in backward) included.
            with sync, dist.collective("a training step's gradient exchange"):
                with self.precision.autocast():
                    loss = self.task.loss(self.forward_model, batch, state.step * self.accum + i)
                finite = not dist.all_reduce_any(not bool(torch.isfinite(loss.detach())))
                if finite:
                    self.scaler.scale(loss / self.accum).backward()
                    losses.append(loss.detach().float())
        if finite:
            self._update()
            counts.losses.append(torch.stack(losses).mean())
        else:
            self.optimizer.zero_grad(set_to_none=True)
            state.nonfinite_skipped += 1
            # One warning per window of steps, with the count, is the loop's (`NanGuard`).
            log.debug("non-finite loss at step %d: step skipped", state.step + 1)
        counts.lr, counts.steps = lr, counts.steps + 1
        counts.seconds += time.perf_counter() - start
        state.step += 1
        return finite

    def use_precision(self, precision: Precision) -> None:
        """Train at `precision` from the next step on, with a fresh scaler for it (a recovery
        from non-finite losses switches to float32, whose scaler passes gradients through)."""
        self.precision, self.scaler = precision, precision.make_scaler()

    def _update(self) -> None:
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
