"""The encoder of a checkpoint, and images as it expects them.

The pixel normalisation a model was trained with is part of its recipe, which a checkpoint
directory keeps in meta.json; a bare weights file falls back to ImageNet's statistics.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cratemae.checkpoints import check_state_dict_matches, read_model_weights
from cratemae.checkpoints.files import read_json
from cratemae.checkpoints.layout import META
from cratemae.checkpoints.resolve import resolve_checkpoint
from cratemae.data import eval_transform
from cratemae.errors import BadInputError
from cratemae.model import CrateEncoder, CrateMAEConfig
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["LoadedEncoder", "load_encoder", "load_images"]


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder in eval mode, with what is needed to feed it and to show its input."""

    encoder: CrateEncoder
    path: Path  # the checkpoint directory or weights file actually read
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalization_from_recipe: bool  # False: ImageNet statistics were assumed

    @property
    def config(self) -> CrateMAEConfig:
        return self.encoder.config

    def unnormalize(self, imgs: torch.Tensor) -> np.ndarray:
        """Normalised (B, 3, H, W) -> (B, H, W, 3) float32 in [0, 1], for display."""
        mean = torch.tensor(self.mean, device=imgs.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=imgs.device).view(3, 1, 1)
        out = (imgs.float() * std + mean).clamp(0, 1)
        return out.permute(0, 2, 3, 1).cpu().numpy()


def _normalization(target: Path) -> tuple[tuple, tuple] | None:
    """data.mean and data.std of the recipe saved with a checkpoint directory, if any."""
    if not (target / META).is_file():
        return None
    recipe = read_json(target / META).get("recipe_toml")
    if not isinstance(recipe, str):
        return None
    try:
        data = tomllib.loads(recipe).get("data", {})
    except tomllib.TOMLDecodeError:
        return None
    return tuple(data.get("mean", IMAGENET_MEAN)), tuple(data.get("std", IMAGENET_STD))


def load_encoder(path: str | os.PathLike[str], device: torch.device | str) -> LoadedEncoder:
    """The encoder of a checkpoint (directory, run directory or weights file), on `device`."""
    target = resolve_checkpoint(path)
    weights, config_dict = read_model_weights(target)
    try:
        config = CrateMAEConfig.from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"{target}: unusable model configuration ({err})") from None
    encoder = CrateEncoder(config)
    # A full CRATE-MAE state dict holds the encoder under `encoder.`; an encoder-only one
    # holds it at the top level.
    if any(k.startswith("encoder.") for k in weights):
        weights = {
            k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")
        }
    state = check_state_dict_matches(encoder, weights, str(target))
    encoder.load_state_dict(state)
    norm = _normalization(target) if target.is_dir() else None
    mean, std = norm if norm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return LoadedEncoder(
        encoder=encoder.to(device).eval(),
        path=target,
        mean=tuple(mean),
        std=tuple(std),
        normalization_from_recipe=norm is not None,
    )


def load_images(
    paths: Sequence[Path],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """Image files -> batches (B, 3, img_size, img_size), resized and centre-cropped as for
    evaluation, normalised; read one batch at a time."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    tf = eval_transform(img_size, mean, std)
    rng = np.random.default_rng(0)  # the centre crop draws nothing; the transform wants one
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as img:
                    rgb = ImageOps.exif_transpose(img).convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise BadInputError(f"{path}: cannot read the image ({err})") from None
            batch.append(tf(rgb, rng))
        yield torch.stack(batch)
