"""The CRATE-MAE model: layers named after the paper, the encoder, the autoencoder, its
configuration and presets; and MAE's ViT, the baseline, behind the same interface. Pure
PyTorch (and timm's ViT block): no file or terminal I/O.

May import: nothing else of cratemae.
"""

from typing import Any

# Names are imported on first use (PEP 562), so that reading a recipe, which needs only the
# configuration, does not import torch: the command line stays fast to start.
_WHERE = {
    "authors_to_cratemae": "authors", "load_authors_state_dict": "authors",
    "PRESETS": "config", "CrateMAEConfig": "config",
    "CrateMAE": "crate_mae", "MAEOutput": "crate_mae",
    "CrateEncoder": "encoder",
    "build_encoder": "factory", "build_model": "factory", "create_model": "factory",
    "preset_config": "factory",
    "MAEViT": "mae_vit", "ViTEncoder": "mae_vit",
    "ISTA": "layers", "MSSA": "layers", "DecoderLayer": "layers", "EncoderLayer": "layers",
    "random_masking": "masking",
    "masked_patch_loss": "patches", "patchify": "patches", "unpatchify": "patches",
}

__all__ = [
    "ISTA",
    "MSSA",
    "PRESETS",
    "CrateEncoder",
    "CrateMAE",
    "CrateMAEConfig",
    "DecoderLayer",
    "EncoderLayer",
    "MAEOutput",
    "MAEViT",
    "ViTEncoder",
    "authors_to_cratemae",
    "build_encoder",
    "build_model",
    "create_model",
    "load_authors_state_dict",
    "masked_patch_loss",
    "patchify",
    "preset_config",
    "random_masking",
    "unpatchify",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cratemae.model' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"cratemae.model.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
