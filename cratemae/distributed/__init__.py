"""The runtime: launch by torchrun or srun, the process group and its collectives, the
device, numeric precision, and the preemption signals.

Modules are imported on first use, so that a command can listen for the stop signals
(`preemption`, standard library only) before torch is imported.

May import: errors.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Precision", "PreemptionFlag", "choose_device", "dist", "resolve_precision"]

_WHERE = {"Precision": "precision", "resolve_precision": "precision",
          "PreemptionFlag": "preemption", "choose_device": "device"}


def __getattr__(name: str) -> Any:
    if name == "dist":
        return importlib.import_module("cratemae.distributed.dist")
    if name not in _WHERE:
        raise AttributeError(f"module 'cratemae.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cratemae.distributed.{_WHERE[name]}"), name)
