"""Building models: by preset name, or from a configuration (the one place that picks the
class for `config.family`)."""

from __future__ import annotations

from typing import Any

from cratemae.model.config import PRESETS, CrateMAEConfig
from cratemae.model.crate_mae import CrateMAE
from cratemae.model.encoder import CrateEncoder
from cratemae.model.mae_vit import MAEViT, ViTEncoder

__all__ = ["build_encoder", "build_model", "create_model", "preset_config"]


def preset_config(name: str, **overrides: Any) -> CrateMAEConfig:
    """The configuration of preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return CrateMAEConfig.from_dict({**PRESETS[name], **overrides})


def build_model(config: CrateMAEConfig) -> CrateMAE | MAEViT:
    """The initialised autoencoder of `config`: `CrateMAE` ("crate") or `MAEViT` ("vit")."""
    return MAEViT(config) if config.family == "vit" else CrateMAE(config)


def build_encoder(config: CrateMAEConfig, **kwargs: Any) -> CrateEncoder | ViTEncoder:
    """The encoder of `config` alone (`CrateEncoder` or `ViTEncoder`); `kwargs` are the
    encoder's (num_classes, global_pool, drop_path_rate, dynamic_img_size)."""
    return (ViTEncoder if config.family == "vit" else CrateEncoder)(config, **kwargs)


def create_model(name: str, **overrides: Any) -> CrateMAE | MAEViT:
    """`create_model("crate_mae_base", norm_pix_loss=True)` -> an initialised `CrateMAE`;
    `create_model("mae_vit_base")` -> an initialised `MAEViT`."""
    return build_model(preset_config(name, **overrides))
