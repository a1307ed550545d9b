"""Patches of an image, and the masked-patch reconstruction loss."""

from __future__ import annotations

import torch

__all__ = ["masked_patch_loss", "patchify", "unpatchify"]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C): row-major patches, channels last inside a patch."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int = 3
) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of `patchify` for a (h, w) patch grid."""
    B = patches.shape[0]
    p, (h, w), C = patch_size, grid, in_chans
    x = patches.reshape(B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(B, C, h * p, w * p)


def masked_patch_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix: bool = False,
) -> torch.Tensor:
    """Mean squared error per patch, averaged over the removed patches only.

    With `norm_pix`, each target patch is standardised by its own mean and (unbiased)
    variance plus 1e-6, as in MAE.

    Computed in the wider of the two inputs' precisions, and at least float32: a float64
    model keeps float64, as in the authors' code (which casts nothing), and bf16 / fp16
    predictions under autocast are measured in float32.
    """
    target = patchify(imgs, patch_size)  # (B, L, p*p*C)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    per_patch = ((pred.to(dtype) - target.to(dtype)) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()
