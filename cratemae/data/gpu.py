"""GPU decoding (data.decode = "gpu"): nvJPEG decode, crop, resize and flip on the device, to uint8
as the CPU path delivers; `Batch.model_input` normalises it like every batch.

The workers then only read bytes and draw crop boxes, which frees the CPUs when they cannot
decode fast enough for the GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cratemae.data.batch import Batch, EncodedBatch
from cratemae.errors import BadInputError
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["gpu_decode_batch"]


def gpu_decode_batch(
    batch: EncodedBatch,
    device: torch.device | str,
    *,
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Batch:
    """EncodedBatch -> Batch on `device`: images uint8 (B, 3, img_size, img_size), as the
    CPU path delivers them; `Batch.model_input` normalises them with `mean` and `std`.

    A JPEG that nvJPEG cannot decode is replaced by a repeat of a good image of the batch and
    added to `bad` (the loader's bad-fraction check does not see these)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BadInputError(
            f"gpu_decode_batch needs a CUDA device (got {device}); data.decode='cpu'"
        )
    offs = batch.offsets.tolist()
    blobs = [batch.data[offs[i] : offs[i + 1]] for i in range(len(batch))]  # uint8 (n_i,)
    images = _decode(blobs, device)  # [(3, h, w) uint8 | None]
    good = [i for i, x in enumerate(images) if x is not None]
    extra_bad = len(images) - len(good)
    out = torch.zeros(len(images), 3, img_size, img_size, device=device)  # (B, 3, S, S)
    for i, img in enumerate(images):
        if good:  # all bad: zeros, counted as bad
            j = i if img is not None else good[i % len(good)]
            out[i] = _crop_resize(images[j], batch.boxes[j].tolist(), img_size)
    flips = batch.flips.to(device)
    out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
    out = out.round_().to(torch.uint8)  # 0..255, as a CPU crop rounds its pixels
    labels = None if batch.labels is None else batch.labels.to(device, non_blocking=True)
    return Batch(out, labels, batch.bad + extra_bad, dict(batch.bad_shards),
                 mean=tuple(mean), std=tuple(std))


def _decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG decode of a list; on failure, one by one to find the bad ones (None)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates io in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for b in blobs:
                try:
                    out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _crop_resize(img: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """uint8 (3, h, w) -> float (3, size, size) in 0..255, bicubic with antialiasing.

    Boxes are rounded to whole pixels (the CPU path resamples fractional boxes exactly; the
    difference is below a pixel)."""
    h, w = img.shape[-2:]
    left, top = max(0, round(box[0])), max(0, round(box[1]))
    right, bottom = (
        min(w, max(left + 1, round(box[2]))),
        min(h, max(top + 1, round(box[3]))),
    )
    crop = img[:, top:bottom, left:right].float().unsqueeze(0)  # (1, 3, bh, bw)
    out = F.interpolate(
        crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp_(0, 255)
