"""CRATE's layers: MSSA (compression), ISTA (sparsification), and the decoder's inverse.

Tokens are rows: x is (B, N, d). Each layer is one step of an optimisation algorithm on
the sparse rate reduction objective; see the equations in the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ISTA", "MSSA", "DecoderLayer", "EncoderLayer", "PatchEmbed"]

# Block LayerNorms use PyTorch's default eps, as in the authors' code.
BLOCK_NORM_EPS = 1e-5


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C, H, W) -> (B, H/p * W/p, d)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not a multiple of {p}")
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, L, d), row-major patches


class MSSA(nn.Module):
    """Multi-head subspace self-attention: a gradient step on the coding rate R^c.

    One bias-free projection U = [U_1 .. U_K] gives u_k = x U_k, which is query, key and
    value at once: out = concat_k(softmax(u_k u_k^T / sqrt(p)) u_k) W_o^T + b_o.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.u_proj = nn.Linear(dim, dim, bias=False)  # U: head k is a (d, p) slice
        self.out_proj = nn.Linear(dim, dim)  # W_o, b_o

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head subspace coordinates u_k: (B, N, d) -> (B, K, N, p)."""
        B, N, d = x.shape
        return self.u_proj(x).view(B, N, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        u = self.project(x)  # (B, K, N, p)
        # Fused attention with the one shared projection as query, key and value.
        out = F.scaled_dot_product_attention(u, u, u)  # (B, K, N, p); scale 1/sqrt(p)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, d))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit attention matrices softmax(u_k u_k^T / sqrt(p)): (B, K, N, N)."""
        u = self.project(x)
        return torch.softmax(u @ u.transpose(-2, -1) * u.shape[-1] ** -0.5, dim=-1)


class ISTA(nn.Module):
    """One ISTA step against the dictionary D, with no residual around it.

    out = ReLU(y + eta * (y D - y D^T D) - eta * lambda). Since y D - y D^T D = y (D - D^T D),
    the (d, d) matrix is formed once per call (d^3 work) and each token needs one matmul
    instead of three.
    """

    def __init__(self, dim: int, *, step_size: float, lambd: float) -> None:
        super().__init__()
        self.step_size = step_size
        self.lambd = lambd
        self.dictionary = nn.Parameter(torch.empty(dim, dim))  # D: (d, d)
        nn.init.kaiming_uniform_(self.dictionary)  # the authors' choice; never left empty

    def step_matrix(self) -> torch.Tensor:
        """eta * (D - D^T D): (d, d)."""
        D = self.dictionary
        return self.step_size * (D - D.t() @ D)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(y + y @ self.step_matrix() - self.step_size * self.lambd)


class EncoderLayer(nn.Module):
    """Compress (MSSA, with a residual), then sparsify (ISTA, without one)."""

    def __init__(self, dim: int, num_heads: int, *, step_size: float, lambd: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mssa = MSSA(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.ista = ISTA(dim, step_size=step_size, lambd=lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mssa(self.norm1(x))
        return self.ista(self.norm2(x))


class DecoderLayer(nn.Module):
    """The encoder layer inverted: a linear map (no bias, no skip), then minus MSSA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.dictionary = nn.Parameter(torch.empty(dim, dim))  # E: (d, d)
        nn.init.kaiming_uniform_(self.dictionary)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mssa = MSSA(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.linear(self.norm1(x), self.dictionary)  # LN1(x) E^T
        return g - self.mssa(self.norm2(g))
