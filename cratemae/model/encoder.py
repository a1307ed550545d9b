"""The CRATE encoder on its own: a classifier backbone in timm's manner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cratemae.model.config import CrateMAEConfig
from cratemae.model.layers import EncoderLayer, PatchEmbed
from cratemae.model.pos_embed import sincos_2d

__all__ = ["CrateEncoder"]

FINAL_NORM_EPS = 1e-6


class CrateEncoder(nn.Module):
    """Patch embedding, CLS token, fixed sin-cos positions, MSSA + ISTA layers, final norm.

    Args:
        config: The model configuration (only the encoder fields are used).
        num_classes: Size of the classification head; 0 for none (features only).
        global_pool: "token" (the CLS token) or "avg" (mean of the patch tokens).
    """

    def __init__(
        self, config: CrateMAEConfig, *, num_classes: int = 0, global_pool: str = "token"
    ) -> None:
        super().__init__()
        d = config.embed_dim
        self.config = config
        self.embed_dim = self.num_features = d
        self.patch_embed = PatchEmbed(
            patch_size=config.patch_size, in_chans=config.in_chans, embed_dim=d
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        g = config.grid_size
        # Frozen and recomputable, so not part of the state dict.
        self.register_buffer("pos_embed", sincos_2d(d, g, g)[None], persistent=False)
        self.blocks = nn.ModuleList(
            EncoderLayer(
                d, config.num_heads, step_size=config.ista_step_size, lambd=config.ista_lambda
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(d, eps=FINAL_NORM_EPS)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)

    # --- embedding -------------------------------------------------------------------------
    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, d): the stored table, or one recomputed for another grid."""
        g = self.config.grid_size
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        table = sincos_2d(self.embed_dim, grid_h, grid_w)[None]
        return table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)

    def embed(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (B, L, d), the CLS token with its position (1, 1, d),
        and the patch positions alone (1, L, d)."""
        p = self.config.patch_size
        pos = self.position_table(imgs.shape[-2] // p, imgs.shape[-1] // p)  # (1, 1+L, d)
        tokens = self.patch_embed(imgs) + pos[:, 1:]
        return tokens, self.cls_token + pos[:, :1], pos[:, 1:]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the layers and the final norm on embedded tokens: (B, N, d) -> (B, N, d)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    # --- timm-style interface --------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the whole, unmasked image: (B, C, H, W) -> (B, 1+L, d)."""
        tokens, cls, _ = self.embed(imgs)
        return self.encode(torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1))

    def forward_intermediates(
        self, imgs: torch.Tensor, indices: Sequence[int], *, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of the encoder layers in `indices` (negative counts from the end), each
        (B, 1+L, d); with `norm`, passed through the final norm."""
        depth = len(self.blocks)
        wanted = sorted({i % depth for i in indices})
        if any(not -depth <= i < depth for i in indices):
            raise IndexError(f"layer indices {list(indices)} out of range for depth {depth}")
        tokens, cls, _ = self.embed(imgs)
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        out = {}
        for i, block in enumerate(self.blocks[: wanted[-1] + 1]):
            x = block(x)
            if i in wanted:
                out[i] = self.norm(x) if norm else x
        return [out[i % depth] for i in indices]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1+L, d) -> (B, d): the CLS token or the mean of the patch tokens."""
        return features[:, 1:].mean(dim=1) if self.global_pool == "avg" else features[:, 0]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(features)
        return x if pre_logits else self.head(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            self.head = head.to(self.cls_token.device)
        else:
            self.head = nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, for layer-wise learning-rate decay (timm's format)."""
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        return dict(stem=r"^cls_token|^patch_embed", blocks=blocks)
