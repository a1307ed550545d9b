"""Mixed precision: bf16 autocast by default on GPUs, fp16 with a scaler, fp32 always on CPU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Precision", "resolve_precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # the precision in effect: "bf16", "fp16" or "fp32"
    device_type: str
    note: str  # a line for the log when the recipe's choice was changed

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def make_scaler(self) -> torch.amp.GradScaler:
        # A disabled scaler passes gradients through; only fp16 needs scaling.
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The recipe's precision, or fp32 on a CPU (mixed precision is a GPU feature here)."""
    if device.type != "cuda" and requested != "fp32":
        return Precision("fp32", device.type, f"run.precision {requested} -> fp32 on {device}")
    return Precision(requested, device.type, "")

