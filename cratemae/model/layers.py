"""CRATE's layers: MSSA (compression), ISTA (sparsification), and the decoder's inverse.

Tokens are rows: x is (B, N, d). Each layer is one step of an optimisation algorithm on
the sparse rate reduction objective; see the equations in the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ISTA", "MSSA", "DecoderLayer", "DropPath", "EncoderLayer", "PatchEmbed"]

# Block LayerNorms use PyTorch's default eps, as in the authors' code.
BLOCK_NORM_EPS = 1e-5


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C, H, W) -> (B, H/p * W/p, d).

    The size check (sides a multiple of p) is the encoder's `_checked_images`, a torch.fx
    leaf: a branch on the input's shape here would stop torch.fx from tracing the model.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
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


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random `drop_prob` of
    the samples and scale the others by 1 / (1 - drop_prob); the identity in eval."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, d)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class EncoderLayer(nn.Module):
    """Compress (MSSA, with a residual), then sparsify (ISTA, without one).

    `drop_path` (stochastic depth) acts on the MSSA residual branch only: ISTA has no
    residual around it, so there is no branch to drop there. It is the identity unless the
    encoder's `drop_path_rate` sets it, so the computation is otherwise unchanged.
    """

    def __init__(self, dim: int, num_heads: int, *, step_size: float, lambd: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mssa = MSSA(dim, num_heads)
        self.drop_path: nn.Module = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.ista = ISTA(dim, step_size=step_size, lambd=lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mssa(self.norm1(x)))
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
