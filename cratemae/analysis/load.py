"""The encoder of a checkpoint, and images as it expects them.

Both come from the one implementation every command uses: the encoder from
`cratemae.weights.load` (with the pixel normalisation its recipe or export recorded, else
ImageNet's), the pixels of an image file from `cratemae.data.decode.read_image_file`, so
that `analyze` sees what `reconstruct` sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from cratemae.data import eval_transform
from cratemae.data.decode import read_image_file
from cratemae.weights.load import LoadedModel
from cratemae.weights.load import load_encoder as _load_encoder

__all__ = ["LoadedEncoder", "load_encoder", "load_images"]

# What analyze works on: the one loader's result (`.encoder`, `.config`, `.mean`, `.std`,
# `.path`, `.preprocessing_known`, `.unnormalize`).
LoadedEncoder = LoadedModel


def load_encoder(path: str | os.PathLike[str], device: torch.device | str) -> LoadedEncoder:
    """The encoder of a checkpoint (directory, run directory or weights file), on `device`,
    in eval mode: `cratemae.weights.load.load_encoder`."""
    return _load_encoder(path, device=device)


def load_images(
    paths: Sequence[Path],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """Image files -> batches (B, 3, img_size, img_size), resized and centre-cropped as for
    evaluation, normalised; read one batch at a time."""
    tf = eval_transform(img_size, mean, std)
    rng = np.random.default_rng(0)  # the centre crop draws nothing; the transform wants one
    for start in range(0, len(paths), batch_size):
        batch = [tf(read_image_file(path), rng) for path in paths[start : start + batch_size]]
        yield torch.stack(batch)
