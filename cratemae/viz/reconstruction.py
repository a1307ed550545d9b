"""Mask images, reconstruct them with a `CrateMAE` or an `MAEViT` (the same `forward` and
`MAEOutput`), and measure the result in pixels.

Images are float32 (B, 3, S, S) in [0, 1]; the model sees them normalised with the mean
and std it was trained with, and its prediction is mapped back to [0, 1] for display and
for the PSNR over the masked patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cratemae.data.transforms import normalize, unnormalize
from cratemae.errors import CrateMAEError
from cratemae.model import CrateMAE, MAEViT, patchify, unpatchify

__all__ = ["Reconstruction", "mask_noise", "masked_psnr", "reconstruct"]

MASK_GREY = 0.5  # fill of the hidden patches in the "masked" panel


@dataclass(frozen=True)
class Reconstruction:
    """Panels of one image, each (3, S, S) in [0, 1], and the PSNR over hidden patches."""

    original: torch.Tensor
    masked: torch.Tensor
    prediction: torch.Tensor  # the model's output everywhere
    pasted: torch.Tensor  # the prediction where hidden, the original where visible
    mask: torch.Tensor  # (L,) 1 = hidden
    psnr: float  # dB, over the hidden pixels of `prediction`


def mask_noise(num_patches: int, seed: int, batch: int) -> torch.Tensor:
    """(batch, L) masking noise: one seeded draw shared by every image, so that images
    in one figure are masked alike and a seed always gives the same mask."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, num_patches, generator=g).expand(batch, -1).contiguous()


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> float:
    """PSNR in dB of (3, S, S) images in [0, 1] over the pixels where `pixel_mask` is 1
    (NaN when none is)."""
    hidden = pixel_mask.expand_as(target).bool()
    if not hidden.any():
        return math.nan
    mse = float(((pred - target)[hidden] ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _as_image_patches(
    pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    """Prediction (B, L, p*p*3) in the units of the normalised input. A `norm_pix_loss`
    model predicts each patch standardised; give it the true patch's mean and variance
    back (as MAE's demo does), which reveals those of the hidden patches."""
    if not norm_pix:
        return pred
    target = patchify(imgs, patch_size)  # (B, L, p*p*3)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


@torch.no_grad()
def reconstruct(
    model: CrateMAE | MAEViT,
    pixels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float,
    noise: torch.Tensor,
) -> list[Reconstruction]:
    """pixels (B, 3, S, S) in [0, 1] -> one `Reconstruction` per image; CrateMAEError if
    the model's prediction is not finite."""
    cfg = model.config
    imgs = normalize(pixels, mean, std)
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    if not bool(torch.isfinite(out.pred).all()):  # finite weights can still overflow
        raise CrateMAEError("the model's reconstruction is not finite (inf or NaN: its "
                            "weights overflow in float32); nothing written")
    pred = _as_image_patches(out.pred.float(), imgs, cfg.patch_size, cfg.norm_pix_loss)
    grid = (cfg.grid_size, cfg.grid_size)
    pred_pixels = unnormalize(unpatchify(pred, cfg.patch_size, grid), mean, std)
    patch_mask = out.mask[..., None].expand(-1, -1, cfg.patch_size**2 * 3)  # (B, L, p*p*3)
    pixel_mask = unpatchify(patch_mask, cfg.patch_size, grid)[:, :1]  # (B, 1, S, S)
    masked = pixels * (1 - pixel_mask) + MASK_GREY * pixel_mask
    pasted = pixels * (1 - pixel_mask) + pred_pixels * pixel_mask
    return [
        Reconstruction(
            original=pixels[i], masked=masked[i], prediction=pred_pixels[i], pasted=pasted[i],
            mask=out.mask[i], psnr=masked_psnr(pred_pixels[i], pixels[i], pixel_mask[i]),
        )
        for i in range(pixels.shape[0])
    ]
