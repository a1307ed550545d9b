"""Turning sample bytes into RGB images and labels, and saying precisely why when it fails.

Bad images (corrupt, truncated, not an image, empty, too large) raise `BadSample`, which the
loader counts and skips; a missing or malformed label raises `BadInputError`, because a
labelled run with unlabelled data is a mistake to fix, not noise to skip.

`read_image_file` is the same decoding for one file a person names at inference
(`reconstruct`, `analyze`): there a bad image is a `BadInputError` naming the file.
`cratemae.data.transforms.image_to_tensor` reads files through it and fits them to the model.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cratemae.data.shards import RawSample, read_part
from cratemae.errors import BadInputError

__all__ = [
    "IMAGE_PART_EXTS",
    "MAX_PIXELS",
    "BadLog",
    "BadSample",
    "image_bytes",
    "load_rgb",
    "open_image",
    "parse_label",
    "read_image_file",
]

# Larger images are decompression bombs to skip: PIL's own warning threshold (~9459^2 px).
MAX_PIXELS = 89_478_485
# Extensions that hold the image of a sample, in order of preference.
IMAGE_PART_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif", "img")


class BadSample(Exception):
    """A sample to skip; the message is the reason, for the log."""


def image_bytes(sample: RawSample) -> bytes:
    """The encoded image of a sample (reading it from disk if it was deferred)."""
    if sample.missing is not None:
        raise BadSample(sample.missing)
    ext = next((e for e in IMAGE_PART_EXTS if e in sample.parts), None)
    if ext is None:
        raise BadSample(f"no image member (has: {', '.join(sample.parts) or 'nothing'})")
    try:
        data = read_part(sample.parts[ext])
    except OSError as err:
        raise BadSample(f"unreadable member .{ext}: {err}") from None
    if not data:
        raise BadSample(f"zero-byte member .{ext}")
    return data


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only): a cheap check of format and size before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadSample("image too large (decompression bomb)") from None
    except Exception as err:  # PIL raises many types for garbage
        raise BadSample(f"not an image ({type(err).__name__})") from None
    w, h = img.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise BadSample(f"image size {w}x{h} outside 1..{max_pixels} pixels")
    return img


def load_rgb(img: Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode fully and convert greyscale/palette/CMYK/RGBA/16-bit to 8-bit RGB.

    `draft` lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that size."""
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
            img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as err:  # truncated/corrupt data surfaces here
        msg = str(err).replace("\n", " ")[:120]
        raise BadSample(f"corrupt image ({type(err).__name__}: {msg})") from None


# Inference resizes the short side to the model's input size: a 1,000,000 x 1 image would
# become 224,000,000 x 224 pixels first. No photograph is this elongated.
MAX_ASPECT = 64


def read_image_file(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file -> upright 8-bit RGB, as every inference command reads one.

    The size in the header is checked before anything is decoded (`open_image`: PIL's
    decompression-bomb limit, then `max_pixels`); the EXIF orientation is applied; then
    `load_rgb`'s conversion, so greyscale, palette, CMYK and 16-bit files give the pixels
    training gives them, except that transparent pixels are shown over white, as a viewer
    shows them. Any failure is one `BadInputError` line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: image not found")
    try:
        with open_image(path.read_bytes(), max_pixels) as img:
            w, h = img.size  # from the header: nothing decoded yet
            if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
                raise BadSample(f"{w} x {h} pixels, an aspect ratio beyond {MAX_ASPECT}:1 "
                                f"(resizing its short side would take gigabytes)")
            upright = ImageOps.exif_transpose(img)  # decodes; a copy when already upright
        return load_rgb(_over_white(upright))
    except BadSample as err:
        reason = str(err)
    except Exception as err:  # OSError, PIL's own: a damaged file fails in many ways
        reason = " ".join(str(err).split())[:120] or type(err).__name__
    raise BadInputError(f"{path}: cannot read image: {reason}")


def _over_white(img: Image.Image) -> Image.Image:
    """Transparent pixels over white (RGB); an image without transparency as it is."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def parse_label(sample: RawSample) -> int:
    """The integer `cls` label; BadInputError naming shard and key if absent or malformed."""
    if "cls" not in sample.parts:
        raise BadInputError(
            f"{sample.shard}: sample {sample.key!r} has no cls label (this task needs labels)"
        )
    raw = read_part(sample.parts["cls"])
    try:
        label = int(raw.decode("utf-8").strip())
        if label < 0:
            raise ValueError(label)
    except (UnicodeDecodeError, ValueError):
        raise BadInputError(
            f"{sample.shard}: sample {sample.key!r} has a malformed cls label {raw[:40]!r}"
        ) from None
    return label


class BadLog:
    """Logs skipped samples with shard and key: the first 20, then one in every 1000."""

    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.first, self.every, self.count = first, every, 0
        self.log = logging.getLogger("cratemae.data")

    def __call__(self, shard: str, key: str, reason: str) -> None:
        self.count += 1
        n = self.count
        if n <= self.first or n % self.every == 0:
            more = " (logging 1 in 1000 from now on)" if n == self.first else ""
            self.log.warning(
                "skipped bad sample %r in %s: %s [%d so far]%s", key, shard, reason, n, more
            )
