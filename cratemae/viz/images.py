"""Read any image a person may have at hand into the square a model takes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cratemae.errors import BadInputError

__all__ = ["load_image", "to_square"]


def to_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, palette, CMYK, 16-bit and transparent images as 8-bit RGB; transparent
    pixels over white, as a viewer shows them."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """An image file -> float32 (3, size, size) in [0, 1], upright (EXIF orientation
    applied), resized and centre-cropped. BadInputError naming the file if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            square = to_square(_to_rgb(image), size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise BadInputError(f"{path}: cannot read image ({reason})") from None
    array = np.asarray(square, dtype=np.float32) / 255.0  # (S, S, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
