"""The optimizer a recipe names, over parameter groups that a task may supply.

AdamW for pre-training and fine-tuning; SGD and LARS (MAE's linear probe) for the `mae`
probe. Groups may carry an `lr_scale` (layer-wise lr decay), which the trainer multiplies
into the scheduled lr at every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cratemae.recipe.schema import OptimSection

__all__ = ["LARS", "build_optimizer"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as MAE's
    `util/lars.py`: weight decay and the trust ratio apply to tensors of 2+ dimensions only."""

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0,
                                                g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection,
                    lr: float) -> torch.optim.Optimizer:
    """`optim.name` over `groups` (each with its own weight_decay, maybe an lr_scale)."""
    if optim.name == "adamw":
        fused = any(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, fused=fused or None)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    return LARS(groups, lr=lr, momentum=optim.momentum)
