"""The authors' computation, written plainly: the yardstick, never the product.

Explicit softmax attention, the three-matmul ISTA step, MAE's concatenate-and-gather
masking, MAE's loss as written (no casts: it runs in the inputs' precision). It reads the
parameters (and the position table) of a `CrateMAE`, so gradients flow to them and the fast
path can be checked against it on any configuration and any input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cratemae.model.crate_mae import CrateMAE, MAEOutput
from cratemae.model.layers import MSSA, DecoderLayer, EncoderLayer

__all__ = ["reference_features", "reference_forward"]


def _mssa(m: MSSA, x: torch.Tensor) -> torch.Tensor:
    B, N, d = x.shape
    w = m.u_proj(x).reshape(B, N, m.num_heads, -1).permute(0, 2, 1, 3)  # (B, K, N, p)
    dots = torch.matmul(w, w.transpose(-1, -2)) * w.shape[-1] ** -0.5  # (B, K, N, N)
    out = torch.matmul(dots.softmax(dim=-1), w)  # (B, K, N, p)
    return m.out_proj(out.permute(0, 2, 1, 3).reshape(B, N, d))


def _encoder_layer(layer: EncoderLayer, x: torch.Tensor) -> torch.Tensor:
    x = _mssa(layer.mssa, layer.norm1(x)) + x
    y = layer.norm2(x)
    D, eta, lambd = layer.ista.dictionary, layer.ista.step_size, layer.ista.lambd
    grad_1 = F.linear(F.linear(y, D), D.t())  # y D^T D
    grad_2 = F.linear(y, D.t())  # y D
    return F.relu(y + (eta * (grad_2 - grad_1) - eta * lambd))


def _decoder_layer(layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
    x = F.linear(layer.norm1(x), layer.dictionary)
    return x - _mssa(layer.mssa, layer.norm2(x))


def _loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int,
          norm_pix: bool) -> torch.Tensor:
    """MAE's `patchify` and `forward_loss`, line for line."""
    B, C, H, W = imgs.shape
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(B, C, H // p, p, W // p, p))
    target = target.reshape(B, (H // p) * (W // p), p * p * C)  # (B, L, p*p*C)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
    return (loss * mask).sum() / mask.sum()


def _full_table(model: CrateMAE, imgs: torch.Tensor) -> torch.Tensor:
    p = model.config.patch_size
    return model.encoder.position_table(imgs.shape[-2] // p, imgs.shape[-1] // p)  # (1, 1+L, d)


def reference_forward(
    model: CrateMAE, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> MAEOutput:
    """What the authors' code computes for `model`'s weights (and MAE's encoder order
    when `encoder_visible_only`)."""
    enc, cfg = model.encoder, model.config
    x = enc.patch_embed(imgs)  # (B, L, d)
    B, L, d = x.shape
    pos = _full_table(model, imgs)
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(B, L, device=imgs.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = enc.cls_token.expand(B, -1, -1)

    def restore(kept: torch.Tensor) -> torch.Tensor:  # (B, keep, d) -> (B, L, d)
        filler = model.mask_token.repeat(B, L - kept.shape[1], 1)
        return torch.gather(torch.cat([kept, filler], 1), 1, ids_restore[..., None].repeat(1, 1, d))

    if cfg.encoder_visible_only:  # MAE's order: positions first, then keep
        x_kept = torch.gather(x + pos[:, 1:], 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
        h = torch.cat([cls + pos[:, :1], x_kept], dim=1)
    else:
        h = torch.cat([cls, restore(x_kept)], dim=1) + pos
    for layer in enc.blocks:
        h = _encoder_layer(layer, h)
    latent = enc.norm(h)

    y = latent
    if cfg.encoder_visible_only:  # mask tokens get their positions here, kept latents none
        filled = restore(latent[:, 1:]) + pos[:, 1:] * mask[..., None]
        y = torch.cat([latent[:, :1], filled], dim=1)
    for layer in model.decoder_blocks:
        y = _decoder_layer(layer, y)
    pred = model.decoder_pred(model.decoder_norm(y))[:, 1:]
    loss = _loss(imgs, pred, mask, cfg.patch_size, cfg.norm_pix_loss)
    return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent)


def reference_features(model: CrateMAE, imgs: torch.Tensor) -> torch.Tensor:
    """The authors' encoder on the whole image: (B, 1+L, d) after the final norm."""
    enc = model.encoder
    x = enc.patch_embed(imgs)
    h = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + _full_table(model, imgs)
    for layer in enc.blocks:
        h = _encoder_layer(layer, h)
    return enc.norm(h)
