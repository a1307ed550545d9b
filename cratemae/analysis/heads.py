"""What the measures read of one encoder layer, for each family of model.

The coding rate needs a layer's per-head subspaces, the attention maps its attention
matrices; both are read from the input x = LN1(Z) (B, N, d) of the layer's attention.

- CRATE (`EncoderLayer`): MSSA's own subspaces, u_k = x U_k with U = `mssa.u_proj`, and
  its attention softmax(u_k u_k^T / sqrt(p)). The layer's output is ISTA's.
- ViT (timm's `Block`, MAE's baseline): a layer has no subspaces of its own. Taken in
  their place: each head's slice of the value projection, u_k = x W_v[k]^T with W_v =
  rows [2d:3d] of `attn.qkv.weight` and head k = its rows k*p:(k+1)*p, so W_v[k]^T (d, p)
  stands where U_k does (the value bias, an offset and not a direction, is left out). The
  value is the role of U_k that carries the tokens on: in MSSA u_k is query, key and value
  at once. The attention is timm's, softmax(q_k k_k^T / sqrt(p)), q and k from `qkv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cratemae.model import EncoderLayer

if TYPE_CHECKING:
    from timm.layers import Attention

__all__ = ["SPARSITY_OF", "SUBSPACES_OF", "LayerHeads", "layer_heads"]

# What layers.json says was measured, by family (`CrateMAEConfig.family`).
SUBSPACES_OF = {
    "crate": "MSSA subspaces U_k of the layer (mssa.u_proj, head k = columns k*p:(k+1)*p)",
    "vit": "value projection of the layer's attention as U_k^T (attn.qkv.weight rows "
    "[2d:3d], head k = rows k*p:(k+1)*p; no bias): a ViT layer has no subspaces of its own",
}
SPARSITY_OF = {
    "crate": "fraction of non-zero entries of the layer's output (its ISTA step's)",
    "vit": "fraction of non-zero entries of the layer's output (attention + MLP residual "
    "stream): no step makes it sparse, so about 1",
}


@dataclass(frozen=True)
class LayerHeads:
    """One layer as the measures see it: hook `attention_module` (called with x = LN1(Z))
    and `norm` (LN1) to get x, then `project` and `attention` on x."""

    norm: nn.Module
    attention_module: nn.Module
    project: Callable[[torch.Tensor], torch.Tensor]  # x (B, N, d) -> u (B, K, N, p)
    attention: Callable[[torch.Tensor], torch.Tensor]  # x (B, N, d) -> (B, K, N, N)


def _value_coordinates(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """u_k = x W_v[k]^T per head: (B, N, d) -> (B, K, N, p)."""
    B, N, _ = x.shape
    w_v = attn.qkv.weight[2 * attn.attn_dim :]  # (K*p, d): rows [2d:3d]
    u = F.linear(x, w_v)  # (B, N, K*p)
    return u.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)


def _vit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm's attention matrices softmax(q k^T * scale), explicitly: (B, K, N, N)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, K, N, p) each
    return torch.softmax(q * attn.scale @ k.transpose(-2, -1), dim=-1)


def layer_heads(block: nn.Module) -> LayerHeads:
    """The per-family hook: a CRATE `EncoderLayer` or a timm ViT `Block`."""
    if isinstance(block, EncoderLayer):
        return LayerHeads(block.norm1, block.mssa, block.mssa.project, block.mssa.attention)
    # timm on demand: a CRATE-MAE run (which monitors through here) never imports it.
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if isinstance(block, Block) and isinstance(block.attn, Attention):
        attn = block.attn
        return LayerHeads(
            block.norm1, attn, partial(_value_coordinates, attn), partial(_vit_attention, attn)
        )
    raise TypeError(f"no subspaces known for an encoder layer of type {type(block).__name__}")
