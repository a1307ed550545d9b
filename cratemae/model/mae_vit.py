"""MAE's ViT (He et al., CVPR 2022), the baseline CRATE-MAE is measured against: the same
contract, masking and loss as `CrateMAE`, with timm's attention + MLP blocks instead of MSSA
and ISTA, a narrower decoder behind a linear map, and an encoder that sees the kept patches
only. A port of facebookresearch/mae `models_mae.MaskedAutoencoderViT`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cratemae.model.config import CrateMAEConfig
from cratemae.model.crate_mae import MAEOutput, MaskedAutoencoder
from cratemae.model.encoder import FINAL_NORM_EPS, CrateEncoder, _grid_positions, drop_path_rates
from cratemae.model.masking import random_masking
from cratemae.model.patches import masked_patch_loss
from cratemae.model.pos_embed import sincos_2d

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

__all__ = ["MAEViT", "ViTEncoder", "mae_block"]

# MAE's blocks: LayerNorm with eps 1e-6 (models_mae.py: partial(nn.LayerNorm, eps=1e-6)).
_NORM = partial(nn.LayerNorm, eps=FINAL_NORM_EPS)


def mae_block(dim: int, num_heads: int, mlp_ratio: float) -> Block:
    """One pre-norm transformer block, (B, N, dim) -> (B, N, dim), as MAE builds it:
    x + attn(norm1(x)), then x + mlp(norm2(x)); qkv with bias, MLP hidden mlp_ratio * dim.
    timm is imported here, when a ViT is built: it brings torch's compiler along, seconds of
    start-up that a CRATE-MAE run does not need."""
    from timm.models.vision_transformer import Block

    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_NORM)


@torch.no_grad()
def _init_linear_and_norm(module: nn.Module) -> None:
    """MAE's `_init_weights`: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViTEncoder(CrateEncoder):
    """MAE's ViT encoder: patch embedding, CLS token, fixed sin-cos positions, `depth`
    timm `Block`s (attention + MLP, pre-norm), final norm. Everything else, the timm
    contract included, is `CrateEncoder`'s; `config.ista_*` are not read.

    Args: as `CrateEncoder`. Initialised as MAE initialises its encoder (the head aside).
    """

    def __init__(self, config: CrateMAEConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)  # CrateEncoder's keyword arguments
        self.init_weights()

    @torch.jit.ignore
    def _make_blocks(self, config: CrateMAEConfig) -> nn.ModuleList:
        return nn.ModuleList(
            mae_block(config.embed_dim, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth)
        )

    @torch.no_grad()
    @torch.jit.ignore
    def init_weights(self) -> None:
        """MAE's initialisation of the encoder: xavier-uniform Linear weights and zero
        biases in the blocks, LayerNorm 1 / 0, the patch projection xavier-uniform on its
        flattened kernel (its bias keeps PyTorch's default), the CLS token N(0, 0.02^2)."""
        _init_linear_and_norm(self.blocks)
        _init_linear_and_norm(self.norm)
        w = self.patch_embed.proj.weight  # (d, C, p, p), as a Linear (d, C*p*p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if not self.cls_token.is_meta:  # `normal_` on `meta` (shapes only) imports the compiler
            nn.init.normal_(self.cls_token, std=0.02)

    @torch.jit.ignore
    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth on both residual branches of each block (attention and MLP),
        linear from 0 at the first block to `rate` at the last."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        from timm.layers import DropPath

        for block, r in zip(self.blocks, drop_path_rates(rate, len(self.blocks)), strict=True):
            block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
            block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


class MAEViT(MaskedAutoencoder):
    """MAE's masked autoencoder with a ViT encoder (facebookresearch/mae, models_mae.py).

    The encoder sees the CLS token and the kept patch tokens only; the latent is mapped to
    the decoder's width, mask tokens fill the removed positions, decoder positions are added
    to every token, and `decoder_depth` transformer blocks predict the pixels of each patch.
    Same `forward` and `MAEOutput` as `CrateMAE`: the same masking, the same loss.
    """

    def __init__(self, config: CrateMAEConfig) -> None:
        super().__init__()
        if config.family != "vit":
            raise ValueError(f"MAEViT needs family 'vit', got {config.family!r}")
        self.config = config
        d, dd, g = config.embed_dim, config.decoder_embed_dim, config.grid_size
        self.encoder = ViTEncoder(config)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        # Fixed and recomputable, so not part of the state dict. (1, 1+L, dd), CLS row zero.
        self.register_buffer("decoder_pos_embed", sincos_2d(dd, g, g)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            mae_block(dd, config.decoder_num_heads, config.mlp_ratio)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = _NORM(dd)
        self.decoder_pred = nn.Linear(dd, config.patch_size**2 * config.in_chans)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's `initialize_weights`: the encoder's (see `ViTEncoder.init_weights`), then
        xavier-uniform Linear weights, zero biases and LayerNorm 1 / 0 in the decoder, and
        the mask token N(0, 0.02^2)."""
        self.encoder.init_weights()
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                     self.decoder_pred):
            _init_linear_and_norm(part)
        if not self.mask_token.is_meta:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """imgs (B, C, H, W); noise (B, L) uniform, smallest kept (drawn if not given)."""
        tokens, cls, _ = self.encoder.embed(imgs)  # (B, L, d), (1, 1, d), (1, L, d)
        B, L, d = tokens.shape
        if noise is None:
            noise = torch.rand(B, L, device=imgs.device)
        mask, ids_keep = random_masking(noise, mask_ratio)  # (B, L), (B, keep)
        kept = tokens.gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, keep, d)
        latent = self.encoder.encode(torch.cat([cls.expand(B, -1, -1), kept], dim=1))
        pred = self.decode(latent, ids_keep, imgs)
        loss = masked_patch_loss(
            imgs, pred, mask, self.config.patch_size, norm_pix=self.config.norm_pix_loss
        )
        return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent)

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, imgs: torch.Tensor
               ) -> torch.Tensor:
        """Latent (B, 1+keep, d) -> predicted patches (B, L, p*p*C), CLS dropped."""
        x = self.decoder_embed(latent)  # (B, 1+keep, dd)
        B, _, dd = x.shape
        p = self.config.patch_size
        grid_h, grid_w = imgs.shape[-2] // p, imgs.shape[-1] // p
        pos = self.decoder_position_table(grid_h, grid_w)  # (1, 1+L, dd)
        # Kept tokens back to their places among the mask tokens: MAE's unshuffle.
        full = self.mask_token.expand(B, grid_h * grid_w, dd)
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, dd), x[:, 1:])  # (B, L, dd)
        x = torch.cat([x[:, :1], full], dim=1) + pos  # (B, 1+L, dd)
        for block in self.decoder_blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def decoder_position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, dd): the stored table, or one recomputed for another grid."""
        return _grid_positions(self.decoder_pos_embed, grid_h, grid_w, self.config.grid_size)
