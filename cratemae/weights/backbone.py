"""The pre-trained encoder that probing and fine-tuning start from.

A checkpoint of any kind works: a pre-training checkpoint (a `CrateMAE`, encoder under
`encoder.`), a fine-tuned one (a bare `CrateEncoder`, maybe with a head and an EMA), or a
weights file. The architecture comes from the checkpoint's stored configuration; of the
recipe's `model` section only `img_size` may differ (the position table is recomputed for
the new grid), and any other field it sets must agree with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from cratemae.checkpoints import check_state_dict_matches, read_model_weights
from cratemae.checkpoints.files import file_digest
from cratemae.checkpoints.layout import EMA_PREFIX, MODEL_FILE
from cratemae.checkpoints.resolve import resolve_checkpoint
from cratemae.errors import BadInputError
from cratemae.model import CrateEncoder, CrateMAEConfig
from cratemae.recipe.schema import ModelSection

__all__ = ["checkpoint_digest", "config_key", "encoder_config", "encoder_state", "load_encoder"]


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of the checkpoint's model weights file (what the features depend on)."""
    target = resolve_checkpoint(path)
    file = target if target.is_file() else target / MODEL_FILE
    return file_digest(file)["sha256"]


def encoder_state(weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors, keys as in `CrateEncoder` (no head, no EMA copy)."""
    if any(k.startswith("encoder.") for k in weights):
        return {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    if "patch_embed.proj.weight" in weights:
        return {k: v for k, v in weights.items()
                if not k.startswith(("head.", EMA_PREFIX))}
    raise BadInputError(f"{source}: holds no encoder weights (no 'encoder.*' or "
                        f"'patch_embed.*' keys): not a CRATE-MAE checkpoint")


def encoder_config(stored: dict, model: ModelSection, source: str) -> CrateMAEConfig:
    """The checkpoint's configuration, at the recipe's `model.img_size` if it sets one."""
    try:
        config = CrateMAEConfig.from_dict(stored)
    except (ValueError, TypeError) as err:
        raise BadInputError(f"{source}: stored model configuration is unusable: {err}") from None
    current = config.to_dict()
    for key, value in model.config_overrides().items():
        if key != "img_size" and current.get(key) != value:
            raise BadInputError(
                f"model.{key} = {value!r}, but {source} holds a model with {key} = "
                f"{current.get(key)!r}: probe and finetune take the model from the checkpoint "
                f"(of the model section only img_size may be set)")
    if model.img_size is not None:
        try:
            config = dataclasses.replace(config, img_size=model.img_size)
        except ValueError as err:
            raise BadInputError(f"model.img_size = {model.img_size}: {err}") from None
    return config


def load_encoder(checkpoint: str | Path, model: ModelSection) -> tuple[CrateEncoder, dict]:
    """The checkpoint's encoder (no head) and the configuration dict to store with it."""
    source = str(checkpoint)
    weights, stored = read_model_weights(checkpoint)
    state = encoder_state(weights, source)
    config = encoder_config(stored, model, source)
    encoder = CrateEncoder(config)
    encoder.load_state_dict(check_state_dict_matches(encoder, state, source))
    return encoder, config.to_dict()


def config_key(**parts: object) -> str:
    """A short stable hash of JSON-able parts (for cache file names)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
