"""The efficient forms compute the same function as the plain one, on fresh random inputs.

Float32 on CPU; tolerance 1e-4 absolute / 1e-4 relative on outputs and gradients (the two
paths differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch

from cratemae.model import CrateMAE, CrateMAEConfig
from cratemae.model.layers import ISTA, MSSA
from cratemae.model.reference import reference_features, reference_forward

TOL = dict(atol=1e-4, rtol=1e-4)

CONFIGS = [
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4),
    dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, decoder_num_heads=6),
    dict(img_size=24, patch_size=4, embed_dim=32, depth=1, num_heads=1, decoder_depth=2),
    dict(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=8,
        norm_pix_loss=True,
        ista_lambda=0.1,
        ista_step_size=0.2,
    ),
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, encoder_visible_only=True),
]


def _model(overrides: dict, seed: int) -> CrateMAE:
    values = dict(decoder_depth=overrides.get("depth", 2), decoder_num_heads=4)
    values.update(overrides)
    values["decoder_embed_dim"] = values["embed_dim"]
    torch.manual_seed(seed)
    model = CrateMAE(CrateMAEConfig(**values))
    with torch.no_grad():  # exercise the LayerNorm parameters, not just 1 and 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fast_path_equals_reference(overrides, mask_ratio):
    model = _model(overrides, seed=CONFIGS.index(overrides) * 10 + int(mask_ratio * 10))
    cfg = model.config
    imgs = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    noise = torch.rand(3, cfg.num_patches)

    fast = model(imgs, mask_ratio=mask_ratio, noise=noise)
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_forward(model, imgs, mask_ratio, noise)
    ref.loss.backward()

    assert torch.equal(fast.mask, ref.mask)
    assert int(fast.mask.sum()) == 3 * (cfg.num_patches - int(cfg.num_patches * (1 - mask_ratio)))
    torch.testing.assert_close(fast.loss, ref.loss, **TOL)
    torch.testing.assert_close(fast.pred, ref.pred, **TOL)
    torch.testing.assert_close(fast.latent, ref.latent, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast_grads[name], p.grad, **TOL, msg=name)
    assert any(g.abs().sum() > 0 for g in fast_grads.values())


def test_features_equal_reference_at_other_sizes():
    model = _model(CONFIGS[0], seed=1)
    for size in (32, 48, 16):
        imgs = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats = model.forward_features(imgs)
            assert feats.shape == (2, 1 + (size // 4) ** 2, 64)
            torch.testing.assert_close(feats, reference_features(model, imgs), **TOL)


def test_mssa_sdpa_equals_explicit_softmax():
    torch.manual_seed(0)
    mssa = MSSA(48, num_heads=6)
    x = torch.randn(4, 17, 48)
    u = mssa.project(x)  # (B, K, N, p)
    explicit = torch.softmax(u @ u.transpose(-2, -1) / (8**0.5), dim=-1) @ u
    expected = mssa.out_proj(explicit.transpose(1, 2).reshape(4, 17, 48))
    torch.testing.assert_close(mssa(x), expected, **TOL)
    assert mssa.attention(x).shape == (4, 6, 17, 17)
    torch.testing.assert_close(mssa.attention(x).sum(-1), torch.ones(4, 6, 17), **TOL)


def test_ista_one_matmul_equals_three():
    torch.manual_seed(0)
    ista = ISTA(40, step_size=0.1, lambd=0.5)
    torch.nn.init.kaiming_uniform_(ista.dictionary)
    y = torch.randn(5, 11, 40)
    D = ista.dictionary
    three = torch.relu(y + 0.1 * (y @ D - (y @ D.t()) @ D) - 0.1 * 0.5)
    torch.testing.assert_close(ista(y), three, **TOL)
    assert 0 < (ista(y) > 0).float().mean() < 1  # the threshold really bites
