"""What a task gives the training loop: a model, its data, the loss of a batch, and optional
behaviour declared here with defaults (a task overrides what it needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.data import Loader, SplitData

__all__ = ["Task"]


class Task:
    """The base of pre-training, fine-tuning and MAE's linear probe.

    Required: `model` (the bare module whose state dict is checkpointed), `config` (stored
    with the weights), `data` (the training split) and `loss()`. Optional, with the
    defaults below: `param_groups()`, `ema_decay`, `evaluate()` and `eval_every`,
    `monitor()` and `monitor_every`.
    """

    model: nn.Module
    config: dict[str, Any]
    # The training split, resolved and counted once (`cratemae.data.build_data`): each epoch's
    # loader and the epoch's length come from it.
    data: SplitData
    # Keep an exponential moving average of the weights with this decay (None: no average).
    # It is saved in the checkpoints under `ema.`, so a resumed run continues it.
    ema_decay: float | None = None
    # Evaluate every this many epochs (None: only once, at the end of training), when the
    # task evaluates at all (see `evaluates`).
    eval_every: int | None = None
    # Call `monitor` every this many optimizer steps and at the end of training (None: never).
    monitor_every: int | None = None

    def loader(self, epoch: int, start_batch: int) -> Loader:
        """One epoch of this rank's batches from `start_batch` on: batches with `.images`
        and `.bad`, and `bad_fraction_error()` (see `cratemae.data.Loader`)."""
        return self.data.loader(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        """How many batches `loader()` yields per epoch on this rank, from the epoch plan
        (no loader is built to take its length)."""
        return self.data.batches_per_epoch

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        """The loss of one micro-batch. `micro` numbers micro-batches over the whole run
        (step * accum_steps + i): it seeds anything random in the loss (masks, mixup), so
        that a resumed run repeats it exactly."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer groups, each maybe with an `lr_scale` that multiplies the scheduled lr
        (layer-wise lr decay); None: the optimizer builder's decay / no-decay groups."""
        return None

    @property
    def evaluates(self) -> bool:
        """True when the task overrides `evaluate`: then the loop evaluates at the epochs
        `eval_every` names and at the end, logs each result, and keeps the best weights."""
        return type(self).evaluate is not Task.evaluate

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Scores of `model` on the validation data (`top1`, `top5`, ...), on every rank."""
        raise NotImplementedError

    def monitor(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, Any] | None:
        """Watch the bare `model` during training (validation loss, pictures under `run_dir`):
        called on rank 0 alone, in eval mode and without gradients, while the other ranks
        wait. The result (numbers, lists of numbers, strings) becomes one `"kind": "eval"`
        line of metrics.jsonl and goes to the loggers; None: nothing to log."""
        return None
