"""The fixed 2-D sin-cos position table, as the authors build it: MAE's table, in float32.

Two spellings of one function of the grid size: `sincos_2d` in numpy, bit for bit the
authors' table (what eager PyTorch adds, cached per grid size by the encoder), and
`sincos_2d_torch` in torch operations, for graphs (torch.fx then TorchScript, TorchScript,
ONNX, torch.export): there the grid size may be a traced or symbolic value, so the graph
computes the table for the size it is given instead of holding one size's table.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["sincos_2d", "sincos_2d_torch"]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) float32 positions -> (M, dim) float32: sin of every frequency, then cos."""
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega  # (dim/2,)
    out = pos[:, None] * omega[None, :]  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Table for a grid_h x grid_w patch grid: (1 + grid_h*grid_w, dim), float32.

    Half the channels encode the x (column) coordinate and half the y (row) coordinate, x
    first, as in the authors' code. Tokens are row-major; the CLS row, if any, is zeros.
    Every step is numpy in float32, like the authors' numpy version (positions, frequencies,
    their products, sin and cos; MAE's has float64 frequencies): a table computed in float64
    and rounded once differs from theirs in a third or more of the entries (by up to 1.2e-7
    at width 96 on an 8 x 8 grid), which a model trained in float64 beside their code would
    see. numpy's float32 `power`, `sin` and `cos` are not correctly rounded and may differ by
    one unit in the last place between numpy builds and CPUs (SVML on AVX-512): the table is
    theirs on the same machine.
    """
    if "torch._dynamo" in sys.modules:  # a compiler is loaded: hide the numpy from it
        return _untraced_table()(dim, grid_h, grid_w, cls_token)
    return _table(dim, grid_h, grid_w, cls_token)


@functools.cache
def _untraced_table() -> Callable[[int, int, int, bool], torch.Tensor]:
    """`_table` hidden from torch.compile, which would turn its numpy calls into torch ops
    (other bits). Only torch's compiler, once imported, can trace `sincos_2d`, so the mark
    is made then: making it imports the compiler, 2.4 s of every command's start-up (seen
    by `python -X importtime`), which no eager run needs."""
    return torch.compiler.disable(_table)


def _table(dim: int, grid_h: int, grid_w: int, cls_token: bool) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float32),
                         np.arange(grid_w, dtype=np.float32), indexing="ij")
    emb_x = _sincos_1d(dim // 2, xs.reshape(-1))  # (L, dim/2)
    emb_y = _sincos_1d(dim // 2, ys.reshape(-1))  # (L, dim/2)
    table = np.concatenate([emb_x, emb_y], axis=1)  # (L, dim)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim), dtype=np.float32), table], axis=0)
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))


def sincos_2d_torch(dim: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """`sincos_2d` (with its CLS row of zeros) in torch operations: (1 + grid_h*grid_w, dim).

    The same float32 steps as the numpy table, so the same values to float32 rounding:
    torch's float32 `sin` and `cos` round differently from numpy's in about 7% of the
    entries, by one unit in the last place (6e-8 at most, the values being at most 1).
    Written for every graph: scriptable, and with nothing that reads the sizes as Python
    numbers, so that tracing (ONNX) and torch.export keep them as the input's.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = torch.arange(dim // 4, dtype=torch.float32, device=device) / float(dim // 4)
    omega = 1.0 / torch.pow(torch.full((1,), 10000.0, device=device), omega)  # (dim/4,)
    ys = torch.arange(grid_h, dtype=torch.float32, device=device)  # (grid_h,)
    xs = torch.arange(grid_w, dtype=torch.float32, device=device)  # (grid_w,)
    ys = ys[:, None].expand(grid_h, grid_w).reshape(-1)  # (L,), row-major
    xs = xs[None, :].expand(grid_h, grid_w).reshape(-1)  # (L,)
    ox, oy = xs[:, None] * omega[None, :], ys[:, None] * omega[None, :]  # (L, dim/4)
    table = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)  # (L, dim): x first
    return torch.cat([torch.zeros(1, dim, device=device), table], dim=0)
