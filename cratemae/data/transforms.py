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

`image_to_tensor` is the one way an image a person names (`reconstruct`, `analyze`) becomes
a model input: `fit="eval"` is exactly `eval_transform`'s resize + centre crop, the crop every
evaluation sees; `fit="short-side"` keeps the whole short side (what `reconstruct` draws).
`normalize` / `unnormalize` are the one pixel normalisation and its inverse, for every
path: the loaders, the GPU decode, the reconstructions and the pictures.
"""

from __future__ import annotations

import functools
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cratemae.data.decode import read_image_file
from cratemae.recipe.schema import (
    DEFAULT_AUTO_AUGMENT,
    DEFAULT_RE_PROB,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = [
    "FITS",
    "FIT_EVAL",
    "FIT_SHORT_SIDE",
    "Augmented",
    "BoxTransform",
    "TimmTransform",
    "eval_transform",
    "finetune_transform",
    "fit_image",
    "image_to_tensor",
    "normalize",
    "pretrain_transform",
    "unnormalize",
]

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels

# How an image is fitted to the model's square input (`fit_image`).
FIT_EVAL = "eval"  # short side to img_size*256/224, centre crop: what evaluation sees
FIT_SHORT_SIDE = "short-side"  # short side to img_size, centre crop: the whole short side
FITS = (FIT_EVAL, FIT_SHORT_SIDE)


def _per_channel(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 (3, 1, 1) on `x`'s device: they broadcast over (..., 3, H, W)."""
    return _constants(tuple(map(float, mean)), tuple(map(float, std)), x.device)


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh copy to a GPU at every step would wait for the stream.
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    return m, s


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels (..., 3, H, W) -> float32 (x - mean) / std, same shape: what a model takes.

    Float pixels are in [0, 1]; uint8 pixels (0..255, as decoded) are divided by 255 first.
    One new tensor, contiguous (from a channels-last batch too), the rest in place."""
    m, s = _per_channel(x, mean, std)
    if x.dtype == torch.uint8:
        unit = x.to(torch.float32, memory_format=torch.contiguous_format)
        return unit.div_(255.0).sub_(m).div_(s)
    return (x.float() - m).div_(s)


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The inverse of `normalize`: (..., 3, H, W) -> float32 x * std + mean, clamped to
    [0, 1] (a model's output may overshoot the pixel range), same shape; for display."""
    m, s = _per_channel(x, mean, std)
    return (x.float() * s + m).clamp(0, 1)


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
        return _resize_box(img, box, self.img_size, flip)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """RGB image -> float32 (3, img_size, img_size), normalized."""
        box, flip = self.box(*img.size, rng)
        return normalize(self.crop(img, box, flip), self.mean, self.std)


def _as_uint8_chw(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> uint8 (3, H, W), mirrored left-right if `flip`."""
    return _chw_view(img, flip).contiguous()  # (3, H, W)


def _chw_view(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> uint8 (3, H, W) view of a read-only (H, W, 3) copy of its pixels,
    mirrored left-right if `flip`; never written to (`.contiguous()` copies it)."""
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img)  # (H, W, 3) uint8, read-only: the one copy out of Pillow
    with warnings.catch_warnings():  # torch warns of read-only arrays; this one is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


def _resize_box(img: Image.Image, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """The `box` of an RGB image resized to size x size (bicubic) -> uint8 (3, size, size)."""
    return _as_uint8_chw(img.resize((size, size), Image.Resampling.BICUBIC, box=box), flip)


def _short_side_square(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def fit_image(img: Image.Image, img_size: int, fit: str = FIT_EVAL) -> torch.Tensor:
    """RGB image -> uint8 (3, img_size, img_size), fitted to the model's square input.

    `fit="eval"`: `eval_transform`'s centre crop (short side to img_size*256/224, then the
    central img_size square), the view of every evaluation, probe and embedding.
    `fit="short-side"`: short side to img_size, then the central square: nothing of the
    short side is cut, which is what a person expects to see of a picture they chose.
    ValueError for any other `fit`."""
    if fit == FIT_EVAL:
        return _resize_box(img, _center_box(*img.size, img_size), img_size)
    if fit == FIT_SHORT_SIDE:
        return _as_uint8_chw(_short_side_square(img, img_size))
    raise ValueError(f"fit {fit!r}: expected one of {', '.join(FITS)}")


def image_to_tensor(
    image: Image.Image | str | os.PathLike[str],
    img_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    fit: str = FIT_EVAL,
) -> torch.Tensor:
    """An image, or an image file, -> float32 (3, img_size, img_size): a model input.

    A file is read as every inference command reads one (`read_image_file`: upright, 8-bit
    RGB, size-checked; BadInputError naming the file if it cannot be). The image is then
    fitted (`fit_image`: `fit="eval"` gives exactly what `eval_transform` gives) and
    normalised with `mean` and `std`; without them the pixels stay in [0, 1] (what
    `cratemae.viz.reconstruction.reconstruct` takes and draws)."""
    if not isinstance(image, Image.Image):
        image = read_image_file(image)
    pixels = fit_image(image, img_size, fit)  # uint8 (3, S, S)
    if mean is None or std is None:
        return normalize(pixels, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # x / 255, in [0, 1]
    return normalize(pixels, mean, std)


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


@dataclass(frozen=True)
class Augmented:
    """One fine-tuning sample as a worker sends it.

    pixels: uint8 (3, S, S), after timm's crop, flip and RandAugment (what its ToTensor
      read), normalised where the model runs (`cratemae.data.batch.model_input`).
    erase: timm's random erasing drawn for it, (top, left, noise): float32 (3, h, w) noise
      over the normalised pixels from (top, left), NaN where it leaves them; or None.
    """

    pixels: torch.Tensor
    erase: tuple[int, int, torch.Tensor] | None


class TimmTransform:
    """timm's fine-tuning transform, with its global RNGs seeded from `rng` per call and
    restored afterwards (so an in-process loader does not disturb the training RNGs).

    Split where timm's ToTensor stands: the PIL steps (crop, flip, RandAugment) run here and
    give uint8 pixels; random erasing, which timm applies to the normalised float image, is
    drawn here from the same RNG states (on a NaN canvas: what it draws depends on the image's
    shape only) and applied on the device, so a batch crosses to the device as uint8."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        auto_augment: str = DEFAULT_AUTO_AUGMENT,
        re_prob: float = DEFAULT_RE_PROB,
    ) -> None:
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import MaybeToTensor, ToTensor
        from torchvision import transforms as T

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
        steps = list(self.tf.transforms)
        cut = next(i for i, t in enumerate(steps)
                   if isinstance(t, (MaybeToTensor, ToTensor, T.ToTensor)))
        after = steps[cut + 1:]
        # After ToTensor timm has Normalize (the device's `normalize`) and the erasing only.
        assert isinstance(after[0], T.Normalize), after
        assert all(isinstance(t, RandomErasing) for t in after[1:]), after
        self.pil_steps = T.Compose(steps[:cut])
        self.erasing = after[1] if len(after) > 1 else None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Augmented:
        """RGB image -> its augmented pixels and random erasing."""
        seed = int(rng.integers(0, 2**32))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                pil = self.pil_steps(img)  # RGB in, RGB out; one copy out of Pillow
                rgb = np.array(pil if pil.mode == "RGB" else pil.convert("RGB"))
                pixels = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, S, S)
                return Augmented(pixels, self._erase(pixels.shape))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _erase(self, shape: torch.Size) -> tuple[int, int, torch.Tensor] | None:
        """timm's erasing drawn on a NaN canvas of `shape` -> (top, left, noise) over the
        rows and columns it wrote, or None where it wrote nothing."""
        if self.erasing is None:
            return None
        canvas = self.erasing(torch.full(shape, float("nan")))  # (3, S, S)
        rows, cols = [torch.nonzero(canvas[0].isfinite().any(dim=d)).flatten()
                      for d in (1, 0)]
        if not len(rows):
            return None
        top, left = int(rows[0]), int(cols[0])
        return top, left, canvas[:, top:int(rows[-1]) + 1, left:int(cols[-1]) + 1].clone()


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
