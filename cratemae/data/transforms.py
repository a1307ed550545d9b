"""The three image transforms, each driven by a per-sample random generator.

Every random choice comes from the `rng` passed in (seeded from run seed, epoch and sample
key by the loader), never from worker-global state, so a sample gets the same crop whether
the epoch runs whole or resumes mid-way, with any number of workers.

- `pretrain_transform`: RandomResizedCrop(scale=data.crop_scale, bicubic) + h-flip.
- `eval_transform`: resize short side to img_size*256/224 (bicubic) + centre crop.
- `finetune_transform`: timm's training transform (by default MAE's RandAugment
  rand-m9-mstd0.5-inc1 and random erasing 0.25; `data.auto_augment`, `data.re_prob`);
  mixup/cutmix belong to the training step.
The crop-based two also expose `box()`/`crop()`, which the GPU-decode path reuses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cratemae.recipe.schema import (
    DEFAULT_AUTO_AUGMENT,
    DEFAULT_RE_PROB,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = [
    "BoxTransform",
    "TimmTransform",
    "eval_transform",
    "finetune_transform",
    "normalize",
    "pretrain_transform",
]

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x/255 - mean) / std, same shape."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


class BoxTransform:
    """Crop a box (random or central), resize it to a square, maybe flip, normalize."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] | None,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.img_size, self.scale, self.ratio = img_size, scale, ratio
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def random(self) -> bool:
        """True for the random crop + flip of pre-training, False for the centre crop."""
        return self.scale is not None

    def box(self, w: int, h: int, rng: np.random.Generator) -> tuple[Box, bool]:
        """The source box to resize and whether to flip, for a w x h image."""
        if self.scale is None:
            return _center_box(w, h, self.img_size), False
        return _rrc_box(w, h, self.scale, self.ratio, rng), bool(rng.random() < 0.5)

    def crop(self, img: Image.Image, box: Box, flip: bool) -> torch.Tensor:
        """RGB image -> uint8 (3, img_size, img_size)."""
        s = self.img_size
        out = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        arr = np.asarray(out)  # (s, s, 3) uint8, read-only view
        arr = arr[:, ::-1].copy() if flip else arr.copy()
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, s, s)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """RGB image -> float32 (3, img_size, img_size), normalized."""
        box, flip = self.box(*img.size, rng)
        return normalize(self.crop(img, box, flip), self.mean, self.std)


def _center_box(w: int, h: int, size: int) -> Box:
    """torchvision's Resize(int(size * 256 / 224), bicubic) + CenterCrop(size), as the box of
    the source image they keep: resizing that box alone gives the same pixels."""
    short = int(size * 256 / 224)
    rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = round((rw - size) / 2.0), round((rh - size) / 2.0)  # as torchvision
    sx, sy = w / rw, h / rh
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def _rrc_box(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return (left, top, left + cw, top + ch)
    in_ratio = w / h  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        cw, ch = round(h * max(ratio)), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return (left, top, left + cw, top + ch)


class TimmTransform:
    """timm's fine-tuning transform, with its global RNGs seeded from `rng` per call and
    restored afterwards (so an in-process loader does not disturb the training RNGs)."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        auto_augment: str = DEFAULT_AUTO_AUGMENT,
        re_prob: float = DEFAULT_RE_PROB,
    ) -> None:
        from timm.data import create_transform

        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        try:
            self.tf = create_transform(
                input_size=img_size,
                is_training=True,
                auto_augment=auto_augment,
                interpolation="bicubic",
                re_prob=re_prob,
                re_mode="pixel",
                re_count=1,
                mean=self.mean,
                std=self.std,
            )
        except (AssertionError, KeyError, ValueError) as err:  # timm asserts on its parser
            raise ValueError(
                f"{auto_augment!r} is not a timm augmentation policy "
                f"(e.g. {DEFAULT_AUTO_AUGMENT!r}, 'rand-n2-m5', 'original', 'augmix-m5')"
                + (f": {err}" if str(err) else "")
            ) from None
        _patch_posterize(self.tf)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """RGB image -> float32 (3, img_size, img_size), normalized, augmented."""
        seed = int(rng.integers(0, 2**32))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                return self.tf(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, also for 0 bits (all black): RandAugment's increasing variant asks
    for 0..4 bits, and recent Pillow (13 here) refuses anything outside 1..8."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tf: object) -> None:
    """Point every RandAugment posterize op inside `tf` at `_posterize_any_bits`."""
    from timm.data import auto_augment

    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits


def pretrain_transform(
    img_size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> BoxTransform:
    """RandomResizedCrop(img_size, scale=crop_scale, bicubic) + flip + normalize."""
    return BoxTransform(img_size, mean, std, scale=tuple(crop_scale))


def eval_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> BoxTransform:
    """Resize the short side to img_size*256/224 (bicubic), centre-crop img_size."""
    return BoxTransform(img_size, mean, std, scale=None)


def finetune_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    auto_augment: str = DEFAULT_AUTO_AUGMENT,
    re_prob: float = DEFAULT_RE_PROB,
) -> TimmTransform:
    """timm.data.create_transform(is_training=True, the `auto_augment` policy (MAE's
    RandAugment by default), random erasing with probability `re_prob`); ValueError for a
    policy timm does not know."""
    return TimmTransform(img_size, mean, std, auto_augment, re_prob)
