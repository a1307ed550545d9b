"""analyze, export (timm's Hub layout, ONNX) and reconstruct on MAE's ViT baseline: the
white-box measures against each head's value projection, an export that timm's own
VisionTransformer loads, and a reconstruction through the same `MAEOutput`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from support import cli

from cratemae.analysis import coding_rate, record_layers, sparsity
from cratemae.checkpoints import read_model_weights, write_model_weights
from cratemae.errors import BadInputError
from cratemae.model import PRESETS, CrateMAEConfig, build_model, preset_config
from cratemae.weights.export import timm_call, timm_vit_state
from cratemae.weights.load import load_model

PNG = b"\x89PNG\r\n\x1a\n"
# A tiny MAE ViT: 32 px, patch 4 (64 patches), width 64, 4 heads, 2 blocks; a narrower
# decoder (32 wide, 2 heads, 2 blocks), so that the linear map between them is exercised.
CONFIG = CrateMAEConfig(
    family="vit", encoder_visible_only=True, img_size=32, patch_size=4, embed_dim=64,
    num_heads=4, depth=2, decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=2,
)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, CONFIG.img_size, CONFIG.img_size, generator=g)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """An MAE ViT whose every weight is moved off its initial value (zero biases and unit
    norms would hide a bias or a norm mapped to the wrong place)."""
    torch.manual_seed(seed)
    model = build_model(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MAE ViT's weights file (encoder and decoder), as a checkpoint stores them."""
    model = tiny_vit()
    return write_model_weights(tmp_path_factory.mktemp("vit") / "model.safetensors",
                               model.state_dict(), CONFIG.to_dict())


# --- analyze ----------------------------------------------------------------------------------
def test_vit_layers_are_measured_against_each_heads_value_projection() -> None:
    encoder = tiny_vit().encoder
    x = images(3, seed=1)
    record = record_layers(encoder, x, attention_layers=(0, 1), feature_layer=1)  # 0-based
    d, K, p = CONFIG.embed_dim, CONFIG.num_heads, CONFIG.embed_dim // CONFIG.num_heads

    def values(block, z):  # (B, K, N, p): head k's rows k*p:(k+1)*p of W_v = qkv rows [2d:3d]
        w_v = block.attn.qkv.weight[2 * d :]
        return (block.norm1(z) @ w_v.T).view(z.shape[0], z.shape[1], K, p).transpose(1, 2)

    with torch.no_grad():  # the same, by hand: the layers one by one
        tokens, cls, _ = encoder.embed(x)
        z = torch.cat([cls.expand(3, -1, -1), tokens], dim=1)
        blocks = list(encoder.blocks)
        rates, inputs, sparse = [coding_rate(values(blocks[0], z))], [], [sparsity(z)]
        for block in blocks:
            inputs.append(coding_rate(values(block, z)))
            if block is blocks[1]:
                features = values(block, z).transpose(1, 2).flatten(2)[:, 1:]
            z = block(z)
            rates.append(coding_rate(values(block, z)))
            sparse.append(sparsity(z))
    assert torch.allclose(record.coding_rate, torch.stack(rates, 1), rtol=1e-6)
    assert torch.allclose(record.coding_rate_input, torch.stack(inputs, 1), rtol=1e-6)
    assert torch.equal(record.sparsity, torch.stack(sparse, 1))
    assert bool((record.sparsity[:, 1:] > 0.99).all())  # no ISTA step: the tokens stay dense
    assert record.features is not None and torch.allclose(record.features, features, atol=1e-6)


def test_vit_attention_maps_are_the_ones_the_block_uses() -> None:
    """softmax(q k^T / sqrt(p)) applied to the values and projected gives the block's
    attention output: the maps drawn are the ones the model runs."""
    from cratemae.analysis import layer_heads

    block = tiny_vit().encoder.blocks[1]
    heads = layer_heads(block)
    x = block.norm1(torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        att = heads.attention(x)  # (B, K, N, N)
        B, N, d = x.shape
        v = block.attn.qkv(x)[..., 2 * d :].view(B, N, 4, d // 4).transpose(1, 2)  # with bias
        mixed = (att @ v).transpose(1, 2).reshape(B, N, d)
        torch.testing.assert_close(block.attn.proj(mixed), block.attn(x), rtol=0, atol=1e-5)
    assert torch.allclose(att.sum(-1), torch.ones(B, 4, N))


def test_analyze_writes_every_depth_of_a_vit(vit_weights, photos, tmp_path) -> None:
    run = cli("analyze", "--checkpoint", vit_weights, *photos, "--out", tmp_path,
                   "--batch-size", "1")
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "layers.json").read_text())
    assert summary["family"] == "vit" and "qkv.weight rows [2d:3d]" in summary["subspaces"]
    assert [e["depth"] for e in summary["layers"]] == list(range(CONFIG.depth + 1))
    for entry in summary["layers"]:
        assert math.isfinite(entry["coding_rate"]["mean"]) and entry["coding_rate"]["mean"] > 0
        assert entry["sparsity"]["mean"] > 0.99  # dense at every depth, unlike CRATE's ISTA
    for name in ("layers", "attention-astronaut", "attention-coffee", "pca-astronaut",
                 "pca-coffee"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


# --- export -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_export(vit_weights, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit-export")
    run = cli("export", vit_weights, "--out", out)
    assert run.exit_code == 0, run.output
    assert "encoder only, in timm's VisionTransformer layout" in run.stdout
    return out


def test_timm_loads_a_vit_export_as_its_own_vision_transformer(vit_weights, vit_export) -> None:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(f"local-dir:{vit_export}", pretrained=True).eval()
    assert type(model) is VisionTransformer
    reference = load_model(vit_weights).encoder
    x = images(3, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x),
                                   rtol=0, atol=1e-5)
    record = json.loads((vit_export / "config.json").read_text())
    assert record["architecture"] == record["timm"]["model_name"] == "vit_tiny_patch16_224"
    assert record["model_args"] == {"img_size": 32, "patch_size": 4, "in_chans": 3,
                                    "embed_dim": 64, "depth": 2, "num_heads": 4,
                                    "mlp_ratio": 4.0, "class_token": True, "fc_norm": False,
                                    "global_pool": "token"}
    assert record["encoder_only"] is True and record["num_classes"] == 0
    assert record["pretrained_cfg"]["paper_ids"] == "arXiv:2111.06377"


def test_a_vit_export_is_timms_layout_and_cratemae_reads_it_back(vit_weights,
                                                                  vit_export) -> None:
    weights, config = read_model_weights(vit_export)
    assert config == CONFIG.to_dict()
    assert "pos_embed" in weights and not any(k.startswith(("encoder.", "decoder_", "mask"))
                                              for k in weights)
    reference = load_model(vit_weights).encoder
    torch.testing.assert_close(weights["pos_embed"], reference.pos_embed, rtol=0, atol=0)
    back = load_model(vit_export)
    assert type(back.model).__name__ == "ViTEncoder"
    x = images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(back.model.forward_features(x), reference.forward_features(x))


def test_the_vit_model_card_names_timms_architecture(vit_export) -> None:
    card = (vit_export / "README.md").read_text()
    for text in ("# vit_tiny_patch16_224 (MAE ViT), an image encoder",
                 "- Architecture: `vit_tiny_patch16_224`: width 64, 2 layers, 4 heads, "
                 "MLP ratio 4, patch 4, 32 px", "arXiv:2111.06377"):
        assert text in card, text
    assert "crate_mae" not in card  # no CRATE architecture, no cratemae import needed
    params = int(re.search(r"Parameters: ([\d,]+) in the file", card)[1].replace(",", ""))
    encoder = load_model(vit_export).encoder
    assert params == sum(p.numel() for p in encoder.parameters()) + encoder.pos_embed.numel()


def test_a_vit_classifier_with_avg_pooling_exports_for_timm(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    classifier = build_model(CONFIG).encoder.eval()
    classifier.reset_classifier(3, global_pool="avg")
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(0.05 * torch.randn_like(p))
    source = write_model_weights(tmp_path / "run" / "checkpoints" / "step-000000001" /
                                 "model.safetensors", classifier.state_dict(), CONFIG.to_dict())
    (source.parent / "meta.json").write_text(json.dumps(
        {"recipe_toml": '[finetune]\npool = "avg"\n'}))
    run = cli("export", source, "--out", tmp_path / "out")
    assert run.exit_code == 0, run.output
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert model.num_classes == 3 and model.global_pool == "avg"
    x = images(2, seed=5)
    with torch.no_grad():  # the final norm before the pooling, as in ViTEncoder
        torch.testing.assert_close(model(x), classifier(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("mae_vit_")])
def test_each_vit_preset_is_timms_vit_of_that_name(name: str) -> None:
    import timm

    config = preset_config(name)
    size = name.removeprefix("mae_vit_")
    assert timm_call(config) == {"model_name": f"vit_{size}_patch16_224", "kwargs": {}}
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = timm_vit_state(build_model(config).encoder)
        theirs = timm.create_model(f"vit_{size}_patch16_224", num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_a_learned_position_table_is_refused(vit_export, tmp_path) -> None:
    weights, config = read_model_weights(vit_export)
    weights["pos_embed"] = weights["pos_embed"] + 0.01  # as a timm fine-tune would leave it
    source = write_model_weights(tmp_path / "learned.safetensors", weights, config)
    with pytest.raises(BadInputError, match="position table pos_embed is not the fixed sin-cos"):
        load_model(source)


def test_a_vit_config_that_its_mlp_weights_do_not_bear_out_is_refused(vit_weights,
                                                                     tmp_path) -> None:
    weights, config = read_model_weights(vit_weights)
    source = write_model_weights(tmp_path / "bad.safetensors", weights,
                                 {**config, "mlp_ratio": 64.0})
    with pytest.raises(BadInputError, match=r"says blocks\.0\.mlp\.fc1\.weight of \[4096, 64\]"):
        load_model(source)


def test_onnx_export_of_a_vit_matches_pytorch(vit_weights, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    run = cli("export", vit_weights, "--out", tmp_path, "--format", "onnx")
    assert run.exit_code == 0, run.output
    assert "checked with onnxruntime" in run.stdout
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == (
        "vit_tiny_patch16_224")


# --- reconstruct ------------------------------------------------------------------------------
def test_reconstruct_draws_a_vit_reconstruction(vit_weights, photos, tmp_path) -> None:
    out = tmp_path / "recon.png"
    run = cli("reconstruct", *photos, "--checkpoint", vit_weights, "--out", out)
    assert run.exit_code == 0, run.output
    found = re.findall(r"PSNR (\S+) dB over (\d+) hidden patches", run.stdout)
    assert len(found) == 2 and all(math.isfinite(float(db)) and n == "48" for db, n in found)
    assert out.read_bytes()[:8] == PNG


def test_reconstruct_says_a_vit_export_holds_the_encoder_only(vit_export, photos) -> None:
    run = cli("reconstruct", photos[0], "--checkpoint", vit_export)
    assert run.exit_code == 2
    assert "MAE ViT exports hold the encoder only" in run.stderr
