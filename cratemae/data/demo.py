"""The built-in demo data set: 10 shape classes, 5,000 train / 1,000 val images, 32 px RGB.

Generated (no download), deterministically, and written as real shards by the same writer
as `cratemae shard`, into `$CRATEMAE_CACHE/demo-v2` (default `~/.cache/cratemae`) on first
use. The class is the kind of shape, drawn bright on a dark background; the hues, position,
size, a small rotation and noise vary independently of the class, so a good encoder makes a
linear probe far better than chance (10%). Images are PNG (no JPEG
artefacts). Built in a temporary directory and renamed into place: racing processes or an
interrupted build never leave a broken data set.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cratemae.data.cache import cache_dir
from cratemae.data.folders import INDEX_NAME
from cratemae.data.writer import Item, ShardSummary, write_dataset
from cratemae.fs import temp_path

__all__ = ["CLASSES", "DEMO_SIZES", "build_demo", "demo_dir", "ensure_demo", "render"]

CLASSES = (
    "circle",
    "ring",
    "square",
    "frame",
    "diamond",
    "triangle",
    "plus",
    "x_cross",
    "h_stripes",
    "v_stripes",
)
DEMO_SIZES = {"train": 5000, "val": 1000}
DEMO_VERSION = 2
PER_SHARD = 10  # many small shards: up to 500 train / 100 val readers (ranks x workers)
SIZE, SUPERSAMPLE = 32, 2
_SEED = 20240521
_G = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / (SIZE * SUPERSAMPLE) * 2 - 1  # [-1, 1]
_YY, _XX = np.meshgrid(_G, _G, indexing="ij")  # (64, 64) each


def demo_dir() -> Path:
    return cache_dir() / f"demo-v{DEMO_VERSION}"


def ensure_demo() -> Path:
    """The demo directory, built first if absent."""
    final = demo_dir()
    if (final / INDEX_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)  # unique per process and thread
    tmp.mkdir()  # the umask's permissions (mkdtemp's 0o700 would hide a shared cache)
    try:
        build_demo(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / INDEX_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_demo(out_dir: Path) -> ShardSummary:
    """Generate the demo images and write them as shards in `out_dir` (empty or absent)."""
    splits = {}
    for s, (split, n) in enumerate(DEMO_SIZES.items()):
        labels = np.random.default_rng([_SEED, s]).permutation(np.arange(n) % len(CLASSES))
        splits[split] = [
            Item(f"{split}_{i:05d}", int(y), lambda s=s, i=i, y=int(y): ("png", _png(y, s, i)))
            for i, y in enumerate(labels)
        ]
    return write_dataset(
        splits,
        out_dir,
        classes=CLASSES,
        max_per_shard=PER_SHARD,
        source=f"cratemae demo v{DEMO_VERSION}",
    )


def _png(label: int, split: int, index: int) -> bytes:
    img = render(label, np.random.default_rng([_SEED, split, index]))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One image of shape class `label`: uint8 (32, 32, 3)."""
    cx, cy = rng.uniform(-0.25, 0.25, 2)  # the shape stays inside the image
    r = rng.uniform(0.4, 0.65)  # half-size: the shape spans 13-21 px
    t = rng.uniform(-0.3, 0.3)  # about +-17 degrees: orientation still tells the class
    dx, dy = _XX - cx, _YY - cy
    u, v = np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy
    m = _mask(CLASSES[label], u, v, r).astype(np.float32)  # (64, 64)
    m = m.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # (32,32,1)
    # A bright shape on a dark background, hues drawn independently: with the contrast's sign
    # fixed, small encoders learn the shapes in minutes (with either sign possible they did
    # not, in a few hundred steps).
    bg_col = rng.uniform(0.0, 0.35, 3)
    fg_col = rng.uniform(0.65, 1.0, 3)
    g = _G[::SUPERSAMPLE]  # (32,) coarse grid
    slope = rng.uniform(-0.15, 0.15, 2)
    bg = bg_col + (slope[0] * g[None, :] + slope[1] * g[:, None])[..., None]  # (32, 32, 3)
    fg = fg_col * (1 + rng.uniform(0, 0.2) * rng.standard_normal((SIZE, SIZE, 1)))
    img = bg * (1 - m) + fg * m + rng.normal(0, 0.03, (SIZE, SIZE, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean (64, 64) mask of a shape of half-size r in rotated coordinates (u, v)."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    if kind == "circle":
        return u**2 + v**2 < r**2
    if kind == "ring":
        return np.abs(np.sqrt(u**2 + v**2) - 0.75 * r) < 0.2 * r
    if kind == "square":
        return box < 0.8 * r
    if kind == "frame":
        return (box < 0.85 * r) & (box > 0.5 * r)
    if kind == "diamond":
        return au + av < r
    if kind == "triangle":  # apex up (image y grows downwards)
        return (v < 0.6 * r) & (au < (v + r) * 0.6)
    if kind in ("plus", "x_cross"):
        if kind == "x_cross":
            au, av = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
        return ((au < 0.2 * r) & (av < r)) | ((av < 0.2 * r) & (au < r))
    stripes = np.cos((v if kind == "h_stripes" else u) * np.pi * 2.5 / r) > 0
    return (box < 0.85 * r) & stripes
