"""CRATE-MAE: embed, mask, encode, decode, loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cratemae.model.config import CrateMAEConfig
from cratemae.model.encoder import FINAL_NORM_EPS, CrateEncoder
from cratemae.model.layers import DecoderLayer
from cratemae.model.masking import random_masking
from cratemae.model.patches import masked_patch_loss

__all__ = ["CrateMAE", "MAEOutput", "MaskedAutoencoder"]


@dataclass
class MAEOutput:
    """What one forward pass gives: everything reconstruction and training need."""

    loss: torch.Tensor  # () masked-patch MSE
    pred: torch.Tensor  # (B, L, p*p*C) predicted patches, image order
    mask: torch.Tensor  # (B, L) 1 = removed, 0 = kept
    latent: torch.Tensor  # (B, 1+L, d); (B, 1+kept, d) with encoder_visible_only


class MaskedAutoencoder(nn.Module):
    """What every autoencoder here offers besides `forward`: an `encoder` (a `CrateEncoder`
    or a subclass), a `mask_token`, `decoder_blocks` that honour `grad_checkpointing`."""

    encoder: CrateEncoder
    grad_checkpointing: bool

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the whole, unmasked image, after the final norm: (B, 1+L, d)."""
        return self.encoder.forward_features(imgs)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder layer in the backward pass instead of keeping
        its activations (the same gradients, less memory, about one more forward pass)."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The fine-tuning convention (timm's ViT); pre-training decays the tokens (MAE).
        return {"encoder.cls_token", "mask_token"}


class CrateMAE(MaskedAutoencoder):
    """The white-box masked autoencoder (Pai et al., ICLR 2024), as the authors' code runs it.

    By default the encoder sees the full sequence: kept patch tokens, a learned mask token in
    every removed position, and a CLS token, all with fixed sin-cos positions. With
    `config.encoder_visible_only` it sees only the kept tokens (MAE's encoder), and mask
    tokens (with their positions) are inserted before the decoder instead.
    """

    def __init__(self, config: CrateMAEConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.encoder = CrateEncoder(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_blocks = nn.ModuleList(
            DecoderLayer(d, config.decoder_num_heads) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d, eps=FINAL_NORM_EPS)
        self.decoder_pred = nn.Linear(d, config.patch_size**2 * config.in_chans)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation (MAE's, plus Kaiming-uniform dictionaries)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection as a Linear on the flattened kernel; its bias keeps
        # PyTorch's default, as in MAE.
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, param in self.named_parameters():
            if name.endswith("dictionary"):
                nn.init.kaiming_uniform_(param)
        for token in (self.encoder.cls_token, self.mask_token):
            if not token.is_meta:  # `normal_` on `meta` (shapes only) imports torch's compiler
                nn.init.normal_(token, std=0.02)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """imgs (B, C, H, W); noise (B, L) uniform, smallest kept (drawn if not given)."""
        tokens, cls, pos = self.encoder.embed(imgs)  # (B, L, d), (1, 1, d), (1, L, d)
        B, L, _ = tokens.shape
        if noise is None:
            noise = torch.rand(B, L, device=imgs.device)
        mask, ids_keep = random_masking(noise, mask_ratio)  # (B, L), (B, keep)
        # Mask tokens carry their positions, like every patch token.
        mask_tokens = self.mask_token + pos  # (1, L, d)
        latent = self.encode(tokens, cls, mask, ids_keep, mask_tokens)
        pred = self.decode(latent, ids_keep, mask_tokens)
        loss = masked_patch_loss(
            imgs, pred, mask, self.config.patch_size, norm_pix=self.config.norm_pix_loss
        )
        return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent)

    def encode(
        self,
        tokens: torch.Tensor,
        cls: torch.Tensor,
        mask: torch.Tensor,
        ids_keep: torch.Tensor,
        mask_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Embedded patch tokens (B, L, d) -> latent (B, 1+N, d), N = L or the kept count."""
        B, _, d = tokens.shape
        if self.config.encoder_visible_only:
            tokens = tokens.gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, keep, d)
        else:
            # A select instead of the authors' concatenate-and-gather: the same values,
            # without copying the full sequence through an index.
            tokens = torch.where(mask[..., None].bool(), mask_tokens, tokens)
        return self.encoder.encode(torch.cat([cls.expand(B, -1, -1), tokens], dim=1))

    def decode(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, mask_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Latent -> predicted patches (B, L, p*p*C), CLS dropped."""
        x = latent
        if self.config.encoder_visible_only:
            # Kept latents back to their places among the mask tokens: (B, 1+L, d).
            B, _, d = latent.shape
            full = mask_tokens.expand(B, -1, -1)
            full = full.scatter(1, ids_keep[..., None].expand(-1, -1, d), latent[:, 1:])
            x = torch.cat([latent[:, :1], full], dim=1)
        for block in self.decoder_blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]
