"""The encoder of a checkpoint, and images as it expects them.

The pixel normalisation a model was trained with comes from its recipe (a checkpoint
directory's meta.json) or an export's config.json; otherwise ImageNet's statistics are assumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cratemae.checkpoints.layout import MODEL_FILE
from cratemae.data import eval_transform
from cratemae.errors import BadInputError
from cratemae.model import CrateEncoder, CrateMAEConfig
from cratemae.weights.loading import load_model

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


def load_encoder(path: str | os.PathLike[str], device: torch.device | str) -> LoadedEncoder:
    """The encoder of a checkpoint (directory, run directory or weights file), on `device`,
    read and checked by the loader every command uses."""
    loaded = load_model(path)
    file = loaded.weights_file
    return LoadedEncoder(
        encoder=loaded.encoder.to(device).eval(),
        path=file.parent if file.name == MODEL_FILE else file,
        mean=loaded.mean,
        std=loaded.std,
        normalization_from_recipe=loaded.preprocessing_known,
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
