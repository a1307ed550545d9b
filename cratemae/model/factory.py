"""Building models by preset name."""

from __future__ import annotations

from typing import Any

from cratemae.model.config import PRESETS, CrateMAEConfig
from cratemae.model.crate_mae import CrateMAE

__all__ = ["create_model", "preset_config"]


def preset_config(name: str, **overrides: Any) -> CrateMAEConfig:
    """The configuration of preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return CrateMAEConfig.from_dict({**PRESETS[name], **overrides})


def create_model(name: str, **overrides: Any) -> CrateMAE:
    """`create_model("crate_mae_base", norm_pix_loss=True)` -> an initialised `CrateMAE`."""
    return CrateMAE(preset_config(name, **overrides))
