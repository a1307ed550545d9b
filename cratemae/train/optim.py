"""AdamW with the usual no-decay rules, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math

import torch
from torch import nn

from cratemae.recipe import OptimSection

__all__ = ["build_adamw", "lr_at", "param_groups", "peak_lr"]


def peak_lr(optim: OptimSection, effective_batch: int) -> tuple[float, str]:
    """The peak learning rate and a line saying where it came from (for the log)."""
    if optim.lr is not None:
        return optim.lr, f"lr {optim.lr:.3g} (absolute, from optim.lr)"
    lr = optim.base_lr * effective_batch / 256
    return lr, (f"lr {lr:.3g} = optim.base_lr {optim.base_lr:.3g} x effective batch "
                f"{effective_batch} / 256")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay on weight matrices; none on biases, norms, CLS and mask tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, optim: OptimSection, lr: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel for all tensors) on CUDA and CPU: on a
    CPU the per-tensor loop costs about 4x the fused step."""
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=lr, betas=optim.betas, fused=fused or None
    )


def lr_at(step: int, *, total: int, warmup: int, peak: float, minimum: float) -> float:
    """Per-step linear warm-up from 0 to `peak`, then half-cosine down to `minimum`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
