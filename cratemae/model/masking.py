"""Random masking driven by per-sample noise, exactly as MAE and the authors draw it."""

from __future__ import annotations

import torch

__all__ = ["random_masking"]


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """noise (B, L) -> mask (B, L; 1 = removed, 0 = kept) and ids_keep (B, keep).

    The `int(L * (1 - mask_ratio))` tokens with the smallest noise are kept. The mask
    equals MAE's: a token is removed when its rank in the ascending argsort is >= keep.
    """
    L = noise.shape[1]
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: smallest first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # rank of each token
    mask = (ids_restore >= keep).to(noise.dtype)
    return mask, ids_shuffle[:, :keep]
