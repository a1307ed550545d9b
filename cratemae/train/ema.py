"""An exponential moving average of the weights, saved inside the run's checkpoints.

The average lives beside the model; `WithEMA` presents both as one state dict (the model's
keys as they are, the average's under `ema.`), so the checkpoint store saves, verifies and
restores them together and a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cratemae.checkpoints.layout import EMA_PREFIX

__all__ = ["EMA_PREFIX", "WeightEMA", "WithEMA"]



class WeightEMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, new in zip(self.module.state_dict().values(), model.state_dict().values(),
                            strict=True):
            if avg.is_floating_point():
                avg.lerp_(new.detach(), 1.0 - self.decay)
            else:
                avg.copy_(new)


class WithEMA:
    """What `save_run`/`restore_run` see when a run keeps an EMA: one state dict for both."""

    def __init__(self, model: nn.Module, ema: WeightEMA) -> None:
        self.model, self.ema = model, ema

    def state_dict(self) -> dict[str, torch.Tensor]:
        shadow = {EMA_PREFIX + k: v for k, v in self.ema.module.state_dict().items()}
        return {**self.model.state_dict(), **shadow}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
        shadow = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        self.model.load_state_dict(own)
        self.ema.module.load_state_dict(shadow)
