"""Read any image a person may have at hand into the square a model takes."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from cratemae.data.decode import read_image_file

__all__ = ["load_image", "to_square"]


def to_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """An image file -> float32 (3, size, size) in [0, 1]: read as every inference command
    reads one (`read_image_file`: upright, 8-bit RGB, size-checked), resized and
    centre-cropped. BadInputError naming the file if it cannot be."""
    square = to_square(read_image_file(path), size)
    array = np.asarray(square, dtype=np.float32) / 255.0  # (S, S, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
