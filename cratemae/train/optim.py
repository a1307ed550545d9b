"""The optimizer a recipe names, over parameter groups, and the learning-rate schedule as pure
functions.

One builder, `configure_optimizers` (nanoGPT's name), for every caller: AdamW for
pre-training and fine-tuning, SGD and LARS (MAE's linear probe) for the `mae` probe. Groups
may carry an `lr_scale` (layer-wise lr decay), which the trainer multiplies into the
scheduled lr at every step.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from cratemae.errors import BadInputError
from cratemae.recipe import OptimSection

__all__ = ["LARS", "configure_optimizers", "lr_at", "param_groups", "peak_lr"]

# The devices with a fused (one kernel for all tensors) AdamW that we run on; on a CPU the
# per-tensor loop costs about 4x the fused step.
_FUSED_DEVICES = ("cuda", "cpu")


def peak_lr(optim: OptimSection, effective_batch: int) -> tuple[float, str]:
    """The peak learning rate and a line saying where it came from (for the log)."""
    if optim.lr is not None:
        return optim.lr, f"lr {optim.lr:.3g} (absolute, from optim.lr)"
    lr = optim.base_lr * (effective_batch / 256)  # exact scaling by a power of two
    if not math.isfinite(lr):  # each factor is finite; their product need not be
        raise BadInputError(f"optim.base_lr {optim.base_lr:g} x effective batch "
                            f"{effective_batch} / 256 is not a finite learning rate")
    return lr, (f"lr {lr:.3g} = optim.base_lr {optim.base_lr:.3g} x effective batch "
                f"{effective_batch} / 256")


def param_groups(model: nn.Module, weight_decay: float,
                 skip: Collection[str] = ()) -> list[dict[str, Any]]:
    """[decay, no decay]: no decay on 1-D tensors (norms), biases and the names in `skip`
    (wildcards allowed, as in timm's list); everything else that trains is decayed. With no
    `skip` this is MAE's pre-training rule (timm's `add_weight_decay(model, weight_decay)`,
    called with no skip list), so the CLS and mask tokens, (1, 1, d), are decayed. Always
    both groups, decay first and in `named_parameters` order, whatever the weight decay
    (timm merges them when it is 0 and puts no-decay first): torch matches a saved optimizer
    state to the groups by position and size, so the layout must not move. (Pre-training
    checkpoints saved while the tokens were not decayed hold two tensors fewer in the decay
    group: resuming one is refused with one line, by `restore_run`.)"""
    # timm's `param_groups_weight_decay` rule, written out: importing timm for it would
    # cost every command that trains about 1.7 s of start-up (tests/test_optim.py holds the
    # two to the same split).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            undecayed = (p.ndim <= 1 or name.endswith(".bias")
                         or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip))
            (no_decay if undecayed else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_optimizers(model: nn.Module, optim: OptimSection, lr: float,
                         groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """`optim.name` over `groups` (default: `param_groups(model, optim.weight_decay)`), each
    group with its own weight_decay and maybe an `lr_scale`. AdamW is fused wherever every
    parameter's device has the fused kernel (CPU and CUDA), whoever supplies the groups."""
    if groups is None:
        groups = param_groups(model, optim.weight_decay)
    if optim.name == "adamw":
        fused = all(p.device.type in _FUSED_DEVICES for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, fused=fused or None)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    return LARS(groups, lr=lr, momentum=optim.momentum)


def lr_at(step: int, *, total: int, warmup: int, peak: float, minimum: float) -> float:
    """Per-step linear warm-up from 0 to `peak`, then half-cosine down to `minimum`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), a copy of MAE's
    `util/lars.py` (from MoCo v3): weight decay and the trust ratio apply to tensors of 2+
    dimensions only, the ratio being trust_coefficient * ||w|| / ||g + wd * w||.

    Not timm's `timm.optim.Lars`, which computes something else: it adapts only when the
    group's weight decay is non-zero (unless `always_adapt`), and MAE's probe runs with
    weight decay 0, where it would be plain SGD; with `always_adapt` it scales 1-D tensors
    (biases) too; and it divides by ||g|| + wd * ||w|| + eps, not by the norm of the update
    itself. The two agree only on 2-D+ tensors with weight decay 0 and `always_adapt`
    (tests/test_optim.py holds that, and this class to MAE's formula).
    """

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
