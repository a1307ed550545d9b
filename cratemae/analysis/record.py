"""One forward pass of the encoder, measured layer by layer through forward hooks.

Layers are numbered from 0 (the first encoder block), as probe.layer and embed's --layers
number them. Depth 0 is the input to layer 0 (patch embedding + positions, CLS in front)
and depth d (1..L) the output of layer d - 1 (for CRATE its ISTA step). Each depth's coding
rate is taken against the subspaces of one layer: layer d - 1's for depth d, and layer 0's
for the input, so that depths 0 and 1 show what the first layer did against its own
subspaces. As
the notes define it, the tokens go through that layer's first LayerNorm before U. Which
subspaces a layer has depends on the family of model: see `cratemae.analysis.heads`.

The hooks only read: the model runs exactly as it would without them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from cratemae.analysis.heads import LayerHeads, layer_heads
from cratemae.analysis.measures import EPS2, coding_rate, sparsity
from cratemae.model import CrateEncoder

__all__ = ["LayerRecord", "record_layers"]


@dataclass
class LayerRecord:
    """What one batch of images showed, depth by depth (L encoder layers)."""

    coding_rate: torch.Tensor  # (B, L+1) float64: R^c of the tokens at each depth
    coding_rate_input: torch.Tensor  # (B, L) float64: R^c of layer l's input, its subspaces
    sparsity: torch.Tensor  # (B, L+1) float64: fraction of non-zero entries
    # Layer l (1-based) -> (B, K, L_patches): the CLS row of each head's attention, patches only.
    cls_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    # (B, L_patches, d): the per-head projections LN1(Z) U of the feature layer, patches only.
    features: torch.Tensor | None = None


def _rate(heads: LayerHeads, z: torch.Tensor, eps2: float) -> torch.Tensor:
    """R^c of tokens z (B, N, d) against the subspaces of one layer: (B,)."""
    return coding_rate(heads.project(heads.norm(z)), eps2)


@torch.no_grad()
def record_layers(
    encoder: CrateEncoder,
    imgs: torch.Tensor,
    *,
    attention_layers: Collection[int] = (),
    feature_layer: int | None = None,
    eps2: float = EPS2,
) -> LayerRecord:
    """Run `encoder` on unmasked images (B, C, H, W) and measure every layer.

    `attention_layers` and `feature_layer` count from 0 (layer 0 is the first block).
    """
    blocks = list(encoder.blocks)
    heads = [layer_heads(block) for block in blocks]
    depth, B = len(blocks), imgs.shape[0]
    rate = torch.full((B, depth + 1), float("nan"), dtype=torch.float64)
    rate_in = torch.full((B, depth), float("nan"), dtype=torch.float64)
    sparse = torch.full((B, depth + 1), float("nan"), dtype=torch.float64)
    record = LayerRecord(rate, rate_in, sparse)

    def on_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        z0 = args[0]  # (B, 1+L, d), what layer 0 receives
        sparse[:, 0] = sparsity(z0).cpu()
        rate[:, 0] = _rate(heads[0], z0, eps2).cpu()

    def on_attention(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]  # (B, 1+L, d) = LN1(Z^i), the input of layer i
            u = heads[i].project(x)  # (B, K, 1+L, p)
            rate_in[:, i] = coding_rate(u, eps2).cpu()
            if i in attention_layers:
                record.cls_attention[i] = heads[i].attention(x)[:, :, 0, 1:].float()
            if i == feature_layer:
                record.features = u.transpose(1, 2).flatten(2)[:, 1:].float()  # (B, L, d)

        return hook

    def on_output(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            sparse[:, i + 1] = sparsity(out).cpu()  # out: (B, 1+L, d), Z^l
            rate[:, i + 1] = _rate(heads[i], out, eps2).cpu()

        return hook

    handles = [blocks[0].register_forward_pre_hook(on_input)]
    for i, block in enumerate(blocks):
        handles.append(heads[i].attention_module.register_forward_pre_hook(on_attention(i)))
        handles.append(block.register_forward_hook(on_output(i)))
    try:
        encoder.forward_features(imgs)
    finally:
        for handle in handles:
            handle.remove()
    if rate.isnan().any() or rate_in.isnan().any() or sparse.isnan().any():
        # A model that stops calling its layers' attention would leave gaps silently.
        raise RuntimeError("record_layers: the encoder did not run every layer and its attention")
    return record
