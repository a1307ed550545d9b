"""The fixed 2-D sin-cos position table, as the authors (and MAE) build it."""

from __future__ import annotations

import torch

__all__ = ["sincos_2d"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sin of every frequency, then cos."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Table for a grid_h x grid_w patch grid: (1 + grid_h*grid_w, dim), float32.

    Half the channels encode the x (column) coordinate and half the y (row) coordinate, x
    first, as in the authors' code. Tokens are row-major; the CLS row, if any, is zeros.
    Computed in float64 and rounded once, like the authors' numpy version.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_x = _sincos_1d(dim // 2, xs.reshape(-1))  # (L, dim/2)
    emb_y = _sincos_1d(dim // 2, ys.reshape(-1))  # (L, dim/2)
    table = torch.cat([emb_x, emb_y], dim=1)  # (L, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()
