"""Draw reconstructions as one labelled PNG: a row per image, four panels per row."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cratemae.fs import atomic_path
from cratemae.viz.reconstruction import Reconstruction

__all__ = ["MIN_PANEL", "render_reconstructions"]

MIN_PANEL = 224  # pixels per panel side at least: small models' 32 px images are upscaled
_GAP, _TEXT = 8, 22  # spacing between panels, height of a text line
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


def render_reconstructions(
    rows: Sequence[tuple[str, Reconstruction]],
    out: str | os.PathLike[str],
    *,
    mask_ratio: float,
    norm_pix: bool,
) -> Path:
    """Write `out` (PNG): column titles, then per row a caption (name, PSNR) and the panels
    original | masked | reconstruction | reconstruction with the visible patches pasted."""
    size = rows[0][1].original.shape[-1]
    scale = max(1, math.ceil(MIN_PANEL / size))
    side = size * scale
    width = 4 * side + 5 * _GAP
    height = _TEXT + len(rows) * (_TEXT + side + _GAP) + _GAP
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
    path = Path(out)
    with atomic_path(path) as tmp:  # never a half-drawn picture under the final name
        canvas.save(tmp, format="PNG")
    return path
