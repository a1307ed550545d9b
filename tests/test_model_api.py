"""The model's public API: presets, masking, patches, the timm-style encoder, purity."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from timm.optim import param_groups_layer_decay

import cratemae.model as M
from cratemae.model import CrateMAEConfig, create_model, patchify, random_masking, unpatchify

# (trainable parameters, encoder-only parameters), from the notes' table.
PARAM_COUNTS = {
    "crate_mae_tiny": (11_256_192, 5_627_904),
    "crate_mae_small": (24_846_528, 12_423_168),
    "crate_mae_base": (43_745_280, 21_872_640),
    "crate_mae_large": (152_821_504, 76_410_880),
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert (total, encoder) == PARAM_COUNTS[name]
    assert model.config.img_size == 224 and model.config.patch_size == 16


def test_create_model_overrides_and_errors():
    model = create_model("crate_mae_tiny", depth=2, decoder_depth=1, img_size=32)
    assert len(model.encoder.blocks) == 2 and len(model.decoder_blocks) == 1
    with pytest.raises(ValueError, match="unknown model"):
        create_model("crate_mae_huge")
    with pytest.raises(ValueError, match="unknown CrateMAEConfig field"):
        create_model("crate_mae_tiny", depht=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CrateMAEConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="must equal embed_dim"):
        CrateMAEConfig(embed_dim=64, num_heads=4, decoder_embed_dim=32, decoder_num_heads=4)


def test_config_round_trips_through_dict():
    cfg = CrateMAEConfig(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_num_heads=4,
        norm_pix_loss=True,
    )
    assert CrateMAEConfig.from_dict(cfg.to_dict()) == cfg


def test_random_masking_keeps_smallest_noise():
    noise = torch.rand(4, 16)
    mask, ids_keep = random_masking(noise, 0.75)
    assert mask.shape == (4, 16) and ids_keep.shape == (4, 4)
    assert torch.equal(mask.sum(1), torch.full((4,), 12.0))
    for b in range(4):
        kept = set(torch.topk(noise[b], 4, largest=False).indices.tolist())
        assert set(ids_keep[b].tolist()) == kept
        assert set((mask[b] == 0).nonzero().flatten().tolist()) == kept


def test_output_shapes_and_noise_drawn_when_missing():
    model = create_model(
        "crate_mae_tiny",
        depth=1,
        decoder_depth=1,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_num_heads=2,
    )
    out = model(torch.randn(2, 3, 32, 32))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.pred.shape == (2, 64, 48)
    assert out.mask.shape == (2, 64) and out.latent.shape == (2, 65, 32)


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 8, 12)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 6, 48)
    # Patch (row 1, col 2) holds pixels [4:8, 8:12], channels last.
    expected = imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1 * 3 + 2], expected)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), imgs)


def test_norm_pix_loss_matches_direct_computation():
    model = create_model(
        "crate_mae_tiny",
        depth=1,
        decoder_depth=1,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_num_heads=2,
        norm_pix_loss=True,
    )
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(imgs, mask_ratio=0.5, noise=noise)
    target = patchify(imgs, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected = per_patch[out.mask.bool()].mean()
    torch.testing.assert_close(out.loss, expected)


def test_encoder_is_a_timm_style_classifier():
    model = create_model("crate_mae_tiny", depth=3, decoder_depth=1, img_size=32, patch_size=8)
    enc = model.encoder
    imgs = torch.randn(2, 3, 32, 32)
    assert enc(imgs).shape == (2, 384)  # no head: pooled features
    enc.reset_classifier(10)
    assert enc(imgs).shape == (2, 10)
    enc.reset_classifier(5, global_pool="avg")
    feats = enc.forward_features(imgs)
    torch.testing.assert_close(enc.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    assert enc.no_weight_decay() == {"cls_token"}
    groups = param_groups_layer_decay(
        enc, weight_decay=0.05, layer_decay=0.5, no_weight_decay_list=enc.no_weight_decay()
    )
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 3 + 2  # stem, three blocks, norm + head
    inter = enc.layer_tokens(imgs, [0, -1], norm=True)  # whole sequences, in the order asked
    torch.testing.assert_close(inter[1], feats)
    assert inter[0].shape == feats.shape and not torch.allclose(inter[0], feats)
    assert torch.equal(enc.layer_tokens(imgs, [-1, 0], norm=True)[1], inter[0])


def test_model_package_imports_no_io_or_upper_layers():
    forbidden = {
        "cratemae.recipe",
        "cratemae.train",
        "cratemae.commands",
        "cratemae.data",
        "cratemae.checkpoints",
        "safetensors",
        "typer",
        "rich",
        "PIL",
        "pathlib",
    }
    package = Path(M.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                    f"{path.name} imports {name}"
                )
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                pytest.fail(f"{path.name} opens a file")


def test_encoder_built_alone_has_finite_initial_weights() -> None:
    from cratemae.model import CrateMAEConfig
    from cratemae.model.encoder import CrateEncoder

    torch.manual_seed(0)
    encoder = CrateEncoder(CrateMAEConfig(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                          num_heads=4, decoder_embed_dim=64,
                                          decoder_num_heads=4, decoder_depth=1))
    for name, p in encoder.named_parameters():
        assert torch.isfinite(p).all(), name
    bound = (6 / 64) ** 0.5  # Kaiming-uniform, fan-in 64: U(-bound, bound), std bound/sqrt(3)
    for block in encoder.blocks:
        D = block.ista.dictionary.detach()
        assert float(D.abs().max()) <= bound
        assert abs(float(D.std()) - bound / 3**0.5) < 0.02
