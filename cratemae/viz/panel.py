"""Draw reconstructions as one labelled picture (PNG, JPEG or WebP, from the file name): a
row per image, four panels per row, and a legend below saying what each column is."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cratemae.errors import BadInputError
from cratemae.fs import atomic_path
from cratemae.viz.reconstruction import Reconstruction

__all__ = ["FORMATS", "LEGEND_HEIGHT", "MIN_PANEL", "picture_format", "render_reconstructions"]

MIN_PANEL = 224  # pixels per panel side at least: small models' 32 px images are upscaled
_GAP, _TEXT = 8, 22  # spacing between panels, height of a text line
# The picture's format follows the extension of its name (Pillow's format names).
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_LEGEND_LINES = 4
LEGEND_HEIGHT = _LEGEND_LINES * _TEXT  # below the last row
_BACKGROUND, _INK = (255, 255, 255), (20, 20, 20)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """(3, S, S) in [0, 1] -> RGB image, enlarged by `scale` with sharp patch edges."""
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def _titles(mask_ratio: float, norm_pix: bool) -> list[str]:
    prediction = "reconstruction" + (" (true patch mean/var)" if norm_pix else "")
    return ["original", f"masked ({mask_ratio:.0%} hidden)", prediction,
            "reconstruction + visible"]


def picture_format(out: str | os.PathLike[str]) -> str:
    """Pillow's format for the extension of `out`; BadInputError for any other, so that a
    `.jpg` never holds PNG bytes."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(f"--out {out}: unknown picture format {suffix or '(no extension)'!r}"
                            f"; name it .png, .jpg, .jpeg or .webp")
    return FORMATS[suffix]


def _legend(size: int, patch_size: int | None) -> list[str]:
    """What each column is, that predictions on visible patches mean nothing, and the size
    the model took the images at (they are shown enlarged)."""
    patches = f", patches of {patch_size}x{patch_size} px" if patch_size else ""
    return [
        f"Model input: {size}x{size} px{patches} (images are resized and centre-cropped to "
        "it, and shown enlarged).",
        "original: the model's input | masked: what the encoder sees (grey = hidden patches)",
        "reconstruction: the model's output on every patch; on visible patches it is "
        "unconstrained (the loss covers only hidden ones)",
        "reconstruction + visible: the output on hidden patches, the original on visible ones",
    ]


def render_reconstructions(
    rows: Sequence[tuple[str, Reconstruction]],
    out: str | os.PathLike[str],
    *,
    mask_ratio: float,
    norm_pix: bool,
    patch_size: int | None = None,
) -> Path:
    """Write `out` (PNG, JPEG or WebP, by its extension): column titles, then per row a
    caption (name, PSNR) and the panels original | masked | reconstruction | reconstruction
    with the visible patches pasted, then the legend."""
    fmt = picture_format(out)
    size = rows[0][1].original.shape[-1]
    scale = max(1, math.ceil(MIN_PANEL / size))
    side = size * scale
    width = 4 * side + 5 * _GAP
    height = _TEXT + len(rows) * (_TEXT + side + _GAP) + _GAP + LEGEND_HEIGHT
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    for col, title in enumerate(_titles(mask_ratio, norm_pix)):
        draw.text((_GAP + col * (side + _GAP), 4), title, fill=_INK, font=font)
    y = _TEXT
    for name, rec in rows:
        psnr = "n/a" if math.isnan(rec.psnr) else f"{rec.psnr:.2f} dB"
        draw.text((_GAP, y + 4), f"{name}  -  PSNR over hidden patches: {psnr}", fill=_INK,
                  font=font)
        y += _TEXT
        panels = (rec.original, rec.masked, rec.prediction, rec.pasted)
        for col, panel in enumerate(panels):
            canvas.paste(_to_pil(panel, scale), (_GAP + col * (side + _GAP), y))
        y += side + _GAP
    for line in _legend(size, patch_size):
        draw.text((_GAP, y + 4), line, fill=_INK, font=font)
        y += _TEXT
    path = Path(out)
    with atomic_path(path) as tmp:  # never a half-drawn picture under the final name
        canvas.save(tmp, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    return path
