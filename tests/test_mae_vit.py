"""MAE's ViT baseline (`mae_vit_*`): parameter counts against MAE's, MAE's masking and
decoder computed as models_mae.py writes them, its initialisation, the encoder contract,
loading by family, and the same commands as CRATE-MAE (pretrain, probe)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from support import REPO
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from cratemae.bench.speed import BenchSpec, forward_flops, run_bench
from cratemae.checkpoints import write_model_weights
from cratemae.commands.app import build_app
from cratemae.errors import BadInputError
from cratemae.model import (
    PRESETS,
    CrateEncoder,
    CrateMAE,
    CrateMAEConfig,
    MAEViT,
    ViTEncoder,
    build_encoder,
    build_model,
    create_model,
    patchify,
    preset_config,
)
from cratemae.train.optim import param_groups
from cratemae.weights.load import load_encoder, load_model

DEMO_MAE = REPO / "recipes" / "demo-mae.toml"
PROBE = REPO / "recipes" / "probe" / "demo.toml"
FINETUNE = REPO / "recipes" / "finetune" / "demo.toml"
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2,
             decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=2)

# mae_vit_*: (trainable total, encoder, decoder; fixed sin-cos buffer values, encoder's).
# MAE counts its position tables as (frozen) parameters: ViT-B/16 with decoder 111.9 M =
# 111,655,680 + 252,160, its encoder 85.8 M = 85,647,360 + 151,296.
PARAM_COUNTS = {
    "mae_vit_tiny": (8_893_184, 5_486_592, 3_406_592, 88_256, 37_824),
    "mae_vit_small": (25_045_760, 21_590_016, 3_455_744, 126_080, 75_648),
    "mae_vit_base": (111_655_680, 85_647_360, 26_008_320, 252_160, 151_296),
    "mae_vit_large": (329_239_296, 303_099_904, 26_139_392, 302_592, 201_728),
}


def small(**overrides) -> MAEViT:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny", **{**SMALL, **overrides})


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(build_app(), list(args))
    return result.exit_code, result.stderr if hasattr(result, "stderr") else result.output


# --- configuration and presets ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_are_maes(name):
    with torch.device("meta"):
        model = create_model(name)
    assert isinstance(model, MAEViT) and isinstance(model.encoder, ViTEncoder)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    encoder_buffers = sum(b.numel() for b in model.encoder.buffers())
    assert (total, encoder, total - encoder, buffers, encoder_buffers) == PARAM_COUNTS[name]
    assert all(p.requires_grad for p in model.parameters())
    assert model.config.img_size == 224 and model.config.patch_size == 16


def test_every_vit_preset_is_maes_encoder_and_a_crate_preset_is_unchanged():
    assert sorted(n for n in PRESETS if n.startswith("mae_vit_")) == sorted(PARAM_COUNTS)
    for name in PARAM_COUNTS:
        config = preset_config(name)
        assert config.family == "vit" and config.encoder_visible_only and config.mlp_ratio == 4
    assert preset_config("mae_vit_base").decoder_embed_dim == 512
    assert preset_config("crate_mae_base").family == "crate"


def test_config_rules_by_family():
    with pytest.raises(ValueError, match="needs encoder_visible_only = true"):
        CrateMAEConfig(family="vit", embed_dim=64, num_heads=2, decoder_embed_dim=64)
    with pytest.raises(ValueError, match="must equal embed_dim"):
        CrateMAEConfig(embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
    with pytest.raises(ValueError, match="mlp_ratio must be positive"):
        CrateMAEConfig(family="vit", encoder_visible_only=True, mlp_ratio=0.0)
    with pytest.raises(ValueError, match="family must be"):
        CrateMAEConfig(family="cnn")  # type: ignore[arg-type]
    vit = CrateMAEConfig(family="vit", encoder_visible_only=True, embed_dim=64, num_heads=2,
                         decoder_embed_dim=32, decoder_num_heads=2)
    assert CrateMAEConfig.from_dict(vit.to_dict()) == vit
    old = {k: v for k, v in CrateMAEConfig().to_dict().items()
           if k not in ("family", "mlp_ratio")}  # a checkpoint saved before the ViT
    assert CrateMAEConfig.from_dict(old).family == "crate"


def test_the_factory_builds_the_family_the_config_names():
    crate = preset_config("crate_mae_tiny", **{k: v for k, v in SMALL.items()
                                                if not k.startswith("decoder_embed")},
                          decoder_embed_dim=64)
    vit = preset_config("mae_vit_tiny", **SMALL)
    assert type(build_model(crate)) is CrateMAE and type(build_model(vit)) is MAEViT
    assert type(build_encoder(crate)) is CrateEncoder
    encoder = build_encoder(vit, num_classes=3, drop_path_rate=0.1)
    assert type(encoder) is ViTEncoder and encoder(images()).shape == (2, 3)


# --- the model ---------------------------------------------------------------------------------
def test_forward_shapes_finite_loss_and_the_encoder_sees_only_the_kept_tokens():
    model = small()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = model(images(), mask_ratio=0.75)
    L, kept = 16, 4
    assert seen == [(2, 1 + kept, 64)]
    assert out.latent.shape == (2, 1 + kept, 64)
    assert out.pred.shape == (2, L, 8 * 8 * 3) and out.mask.shape == (2, L)
    assert out.mask.sum(dim=1).tolist() == [L - kept] * 2
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_features(images()).shape == (2, 1 + L, 64)
    assert "decoder_pos_embed" not in model.state_dict()
    assert "encoder.pos_embed" not in model.state_dict()


def _maes_forward(model: MAEViT, imgs: torch.Tensor, noise: torch.Tensor, ratio: float):
    """models_mae.py's forward_encoder / forward_decoder / forward_loss, as written there."""
    enc, p = model.encoder, model.config.patch_size
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    N, L, D = x.shape
    len_keep = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(N, -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = model.decoder_embed(enc.norm(x))
    mask_tokens = model.mask_token.repeat(N, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    loss = ((pred - patchify(imgs, p)) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def test_masking_and_decoder_are_maes():
    model = small().double()
    imgs = images().double()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = model(imgs, mask_ratio=0.75, noise=noise)
    loss, pred, mask = _maes_forward(model, imgs, noise, 0.75)
    assert torch.equal(out.mask, mask.to(out.mask))
    torch.testing.assert_close(out.pred, pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-12)


def test_initialisation_is_maes():
    model = small(embed_dim=192, num_heads=3, decoder_embed_dim=128)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(bool((m.bias == 0).all()) for m in linears if m.bias is not None)
    qkv = model.encoder.blocks[0].attn.qkv.weight  # xavier-uniform: bound sqrt(6/(in+out))
    assert qkv.abs().max() <= (6 / (192 + 3 * 192)) ** 0.5
    assert qkv.abs().max() > 0.9 * (6 / (192 + 3 * 192)) ** 0.5
    for token in (model.encoder.cls_token, model.mask_token):
        assert 0.01 < float(token.detach().std()) < 0.03


def test_drop_path_reaches_both_branches_of_every_block():
    encoder = build_encoder(preset_config("mae_vit_tiny", **SMALL), drop_path_rate=0.2)
    rates = [0.0, 0.2]
    for block, rate in zip(encoder.blocks, rates, strict=True):
        for branch in (block.drop_path1, block.drop_path2):
            assert getattr(branch, "drop_prob", 0.0) == pytest.approx(rate)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        encoder.set_drop_path_rate(1.0)


def test_encoder_scripts_and_traces_like_crates():
    encoder = build_encoder(preset_config("mae_vit_tiny", **SMALL), num_classes=3).eval()
    x = images()
    with torch.no_grad():
        want = encoder(x)
        torch.testing.assert_close(torch.jit.script(encoder)(x), want)
        torch.testing.assert_close(torch.fx.symbolic_trace(encoder)(x), want)
        inter = encoder.forward_intermediates(x, indices=1, intermediates_only=True)
        assert inter[0].shape == (2, 64, 4, 4)


def test_pretraining_decays_weights_and_tokens_not_biases_or_norms():
    model = small()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "encoder.cls_token", "decoder_embed.weight",
            "encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight"} <= decayed
    assert all(n.endswith(".bias") or "norm" in n for n in kept)
    assert {"encoder.blocks.0.norm1.weight", "decoder_embed.bias"} <= kept


def test_weights_load_back_as_the_family_they_were_saved_as(tmp_path):
    model = small().eval()
    file = write_model_weights(tmp_path / "m.safetensors", model.state_dict(),
                               model.config.to_dict())
    loaded = load_model(file).model
    assert type(loaded) is MAEViT
    encoder, _ = load_encoder(file)
    assert type(encoder) is ViTEncoder
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(images()),
                                   model.forward_features(images()))


def test_bench_flop_count_is_the_models_matrix_products():
    model = small(decoder_depth=3, mlp_ratio=2.0)
    for block in [*model.encoder.blocks, *model.decoder_blocks]:
        block.attn.fused_attn = False  # explicit QK^T and AV products, which torch counts
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(1), mask_ratio=0.5)
    assert forward_flops(model.config, mask_ratio=0.5) == counter.get_total_flops()


def test_bench_refuses_a_vit_it_cannot_check():
    with pytest.raises(BadInputError, match="MAE's ViT has none yet"):
        run_bench(BenchSpec(model="mae_vit_tiny", device="cpu"))


# --- the commands --------------------------------------------------------------------------------
@pytest.mark.parametrize("sets", [
    ["--set", "model.encoder_visible_only=false"],
    ["--set", 'model.name="crate_mae_tiny"', "--set", 'model.family="vit"',
     "--set", "model.encoder_visible_only=false"],
])
def test_a_vit_that_sees_mask_tokens_is_refused_in_one_line(tmp_path, sets):
    # max_steps 1: were the recipe taken, the test would fail in seconds, not train for long.
    code, err = run_cli("pretrain", str(DEMO_MAE), *sets, "--set", "schedule.max_steps=1",
                        "--set", f'run.out_dir="{tmp_path / "run"}"')
    assert code == 2, err
    assert "needs encoder_visible_only = true" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrain_one_step_then_probe_through_the_commands(tmp_path):
    run = tmp_path / "run"
    code, err = run_cli("pretrain", str(DEMO_MAE), "--set", "schedule.max_steps=1",
                        "--set", f'run.out_dir="{run}"')
    assert code == 0, err
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["loss"] > 0
    loaded = load_model(run).model
    assert type(loaded) is MAEViT and loaded.config.embed_dim == 64
    code, err = run_cli("probe", str(PROBE), "--checkpoint", str(run), "--out",
                        str(tmp_path / "probe"), "--set", 'data.train="demo:val"',
                        "--set", "probe.weight_decays=[1e-4]", "--set", "probe.max_iter=50")
    assert code == 0, err
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert 10.0 <= result["top1"] <= 100.0  # features of a ViT encoder, above chance
    code, err = run_cli("finetune", str(FINETUNE), "--checkpoint", str(run), "--out",
                        str(tmp_path / "ft"), "--resume", "never",
                        "--set", "schedule.max_steps=2", "--set", 'data.train="demo:val"')
    assert code == 0, err
    tuned = load_model(tmp_path / "ft").model
    assert type(tuned) is ViTEncoder and tuned.num_classes == 10
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())
