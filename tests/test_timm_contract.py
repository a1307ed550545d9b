"""The encoder against timm's model contract (what timm's generic tests/test_models.py asks
of every model, met as timm's VisionTransformer meets it), each part on its own: the
attributes, forward_intermediates / prune_intermediate_layers / features_only, gradient
checkpointing, TorchScript and torch.fx (with the eager input checks kept), dynamic image
sizes, stochastic depth, and a pretrained_cfg that describes the model built."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import cratemae.weights.timm_models  # noqa: F401  (registers crate_mae_*)
from cratemae.model import PRESETS, CrateMAE, CrateMAEConfig, DecoderLayer, EncoderLayer
from cratemae.model.encoder import _cached_table, drop_path_rates
from cratemae.model.pos_embed import sincos_2d, sincos_2d_torch

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=4)


def small(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("crate_mae_tiny", **{**SMALL, **kwargs}).eval()


def images(batch: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- attributes ------------------------------------------------------------------------------
# The CRATE-MAE presets: MAE's ViT baselines (mae_vit_*) export to timm's own vit_* instead.
CRATE_PRESETS = sorted(n for n in PRESETS if PRESETS[n].get("family", "crate") == "crate")


@pytest.mark.parametrize("name", CRATE_PRESETS)
def test_every_preset_has_timms_attributes(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3)
    d, depth, p = (PRESETS[name][k] for k in ("embed_dim", "depth", "patch_size"))
    assert model.num_features == model.head_hidden_size == model.embed_dim == d
    assert model.num_prefix_tokens == 1
    assert model.feature_info == [dict(module=f"blocks.{i}", num_chs=d, reduction=p)
                                  for i in range(depth)]
    info = timm.models.FeatureInfo(model.feature_info, list(range(depth)))
    assert info.channels() == [d] * depth and info.reduction() == [p] * depth
    assert model.get_classifier().out_features == 3


def test_reset_classifier_without_pooling_returns_the_tokens() -> None:
    model = small()
    x = images()
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_features(x))  # (B, 1+L, d)


def test_timms_generic_forward_backward_and_cfg_checks() -> None:
    """What timm's test_model_backward / test_model_default_cfgs ask of every model."""
    model = small(num_classes=42).train()
    out = model(images(2))
    assert out.shape == (2, 42)
    out.mean().backward()
    params = dict(model.named_parameters())
    assert all(p.grad is not None for p in params.values())  # every parameter is used
    state, cfg = model.state_dict(), model.pretrained_cfg
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(images(2)).shape == (2, model.num_features)


# --- forward_intermediates, prune_intermediate_layers, features_only ------------------------
def test_forward_intermediates_follows_timms_convention() -> None:
    model, x = small(), images(2, 32, 48)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)  # all layers, NCHW
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [(2, 64, 4, 6)] * 4
        tokens = model.layer_tokens(x, [0, 1, 2, 3])  # (B, 1+L, d) per layer, CLS first
        for t, seq in zip(inter, tokens, strict=True):
            assert torch.equal(t, seq[:, 1:].reshape(2, 4, 6, 64).permute(0, 3, 1, 2))
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in nlc] == [(2, 24, 64)] * 2  # the last two layers
        assert torch.equal(nlc[1], tokens[3][:, 1:])
        normed = model.forward_intermediates(x, [-1], norm=True, intermediates_only=True,
                                             output_fmt="NLC", return_prefix_tokens=True)
        (patches, cls), = normed
        assert torch.equal(torch.cat([cls, patches], 1), final)
        early, inter_early = model.forward_intermediates(x, [1], stop_early=True)
        assert torch.equal(early, model.norm(tokens[1]))  # stopped after layer 1
        assert torch.equal(inter_early[0], inter[1])
    with pytest.raises(IndexError):
        model.forward_intermediates(x, [4])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_layers_asked_for() -> None:
    model, x = small(num_classes=5), images()
    with torch.no_grad():
        _, wanted = model.forward_intermediates(x, [0, 1])
        assert model.prune_intermediate_layers([0, -3], prune_norm=True) == [0, 1]
        assert len(model.blocks) == 2 and model.num_classes == 0
        _, got = model.forward_intermediates(x, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(got, wanted, strict=True))


def test_features_only_returns_feature_maps() -> None:
    reference = small()
    features = small(features_only=True)
    assert features.feature_info.channels() == [64] * 3  # the last three layers by default
    assert features.feature_info.reduction() == [8] * 3
    x = images(2, 32, 32)
    with torch.no_grad():
        maps = features(x)
        _, expected = reference.forward_intermediates(x, 3)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)] * 3
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))
    picked = small(features_only=True, out_indices=(0, 2))
    assert len(picked(x)) == 2 and len(picked.model.blocks) == 3  # pruned after layer 2


# --- gradient checkpointing ------------------------------------------------------------------
def _grads(model: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_layer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of every encoder and decoder layer's forward (module hooks do not see
    the recomputation, so the methods are wrapped)."""
    calls = [0]
    for cls in (EncoderLayer, DecoderLayer):
        def counted(self, x, _forward=cls.forward):
            calls[0] += 1
            return _forward(self, x)
        monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("which", ["encoder", "autoencoder"])
def test_grad_checkpointing_recomputes_the_layers_with_the_same_gradients(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    config = CrateMAEConfig(img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=3,
                            decoder_embed_dim=64, decoder_num_heads=4, decoder_depth=2)
    model = CrateMAE(config)
    if which == "encoder":
        model = model.encoder
        model.reset_classifier(5)
        loss_of = lambda m: m(images()).square().sum()  # noqa: E731
        blocks = list(model.blocks)
    else:
        noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
        loss_of = lambda m: m(images(), noise=noise).loss  # noqa: E731
        blocks = [*model.encoder.blocks, *model.decoder_blocks]
    calls = _count_layer_calls(monkeypatch)
    plain = _grads(model, loss_of)
    assert calls[0] == len(blocks)
    model.set_grad_checkpointing(True)
    calls[0] = 0
    checked = _grads(model, loss_of)
    assert calls[0] == 2 * len(blocks)  # each layer ran again in the backward pass
    assert plain.keys() == checked.keys()
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


# --- TorchScript and torch.fx ----------------------------------------------------------------
def test_torchscript_matches_eager_and_keeps_the_input_checks() -> None:
    model = small(num_classes=5)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        for h, w in ((32, 32), (48, 64)):  # the training size, and another one
            torch.testing.assert_close(scripted(images(2, h, w)), model(images(2, h, w)),
                                       rtol=1e-5, atol=1e-5)
        with pytest.raises(torch.jit.Error, match="not a multiple of 8"):
            scripted(images(1, 30, 32))
    with pytest.raises(ValueError, match=r"image size \(30, 32\) is not a multiple of 8"):
        model(images(1, 30, 32))


@pytest.mark.parametrize("dim, gh, gw", [(64, 4, 6), (384, 14, 14), (768, 10, 18)])
def test_the_graphs_position_table_is_the_authors_to_float32_rounding(dim, gh, gw) -> None:
    """The torch-ops table (every graph's) against the authors' numpy one: one unit in the
    last place at most (2**-24, the values being at most 1), the CLS row exactly zero."""
    ours, theirs = sincos_2d_torch(dim, gh, gw, torch.device("cpu")), sincos_2d(dim, gh, gw)
    assert ours.shape == theirs.shape == (1 + gh * gw, dim) and ours.dtype == torch.float32
    assert not ours[0].any()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2**-24)


def test_eager_tables_are_the_authors_and_made_once_per_grid_size() -> None:
    model = small()
    assert model.position_table(4, 4) is model.pos_embed  # the training grid: the stored one
    _cached_table.cache_clear()
    with torch.no_grad():
        model(images(1, 48, 64))
    first = model.position_table(6, 8)
    assert first is model.position_table(6, 8)  # the same tensor: made once
    info = _cached_table.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert torch.equal(first, sincos_2d(64, 6, 8)[None])  # the authors' bits, not torch's
    with torch.inference_mode():  # made under inference mode, the table still trains
        model.position_table(5, 7)
    model.train()(images(2, 40, 56)).sum().backward()


def test_fx_then_torchscript_runs_at_any_size() -> None:
    """timm's test_model_forward_fx_torchscript sequence (set_scriptable, timm's fx feature
    extractor, torch.jit.script), then sizes other than the training one."""
    pytest.importorskip("torchvision")
    from timm_generic import fx_model

    with timm.set_scriptable(True):
        model = small(num_classes=5)
    scripted = torch.jit.script(fx_model(model))
    with torch.no_grad():
        for h, w in ((32, 32), (24, 40)):
            (out,) = scripted(images(2, h, w)).values()
            torch.testing.assert_close(out, model(images(2, h, w)), rtol=1e-5, atol=1e-5)


def test_fx_traces_the_model_and_runs_the_checks_on_the_real_input() -> None:
    model = small(num_classes=5)
    traced = torch.fx.symbolic_trace(model)
    targets = {getattr(n.target, "__name__", "") for n in traced.graph.nodes}
    assert {"_checked_images", "_positions"} <= targets  # leaves, not one size baked in
    with torch.no_grad():
        for h, w in ((32, 32), (48, 64)):
            assert torch.equal(traced(images(2, h, w)), model(images(2, h, w)))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        traced(images(1, 30, 32))


def test_timms_fx_feature_extraction() -> None:
    pytest.importorskip("torchvision")
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = small(num_classes=5)
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1], "blocks.1"])
    x = images()
    with torch.no_grad():
        out = extractor(x)
        assert torch.equal(out[eval_nodes[-1]], model(x))
        assert torch.equal(out["blocks.1"], model.layer_tokens(x, [1])[0])
    maps = small(features_only=True, feature_cls="fx", out_indices=(1, 3))
    assert maps.feature_info.channels() == [64, 64]


# --- image size, stochastic depth, pretrained_cfg --------------------------------------------
def test_dynamic_img_size_recomputes_positions_for_any_multiple_of_the_patch() -> None:
    model = small(dynamic_img_size=True)
    x = images(2, 48, 64)
    with torch.no_grad():
        tokens, _, pos = model.embed(x)
        assert tokens.shape == (2, 48, 64)
        assert torch.equal(pos, sincos_2d(64, 6, 8)[None, 1:])
        assert model(x).shape == (2, 64)
    strict = small(dynamic_img_size=False)
    assert strict.pretrained_cfg["fixed_input_size"] is True
    with pytest.raises(ValueError, match="differs from the model's 32 px"):
        strict(images(1, 48, 64))
    assert strict(images(1)).shape == (1, 64)


def test_drop_path_rate_is_stochastic_depth_on_the_mssa_branch() -> None:
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain, dropped = small(), small(drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in dropped.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = images(8)
    with torch.no_grad():
        assert torch.equal(dropped(x), plain(x))  # eval: the identity
        dropped.train()
        torch.manual_seed(0)
        a = dropped(x)
        torch.manual_seed(0)
        assert torch.equal(dropped(x), a)  # seeded
        assert not torch.allclose(a, plain(x))
    # One layer, its branch dropped for sample 0 only: sample 0 skips MSSA, sample 1 keeps
    # it scaled by 1 / keep.
    block = dropped.blocks[3]
    t = torch.randn(2, 5, 64)
    with torch.no_grad():
        mask = torch.tensor([0.0, 1.0])
        block.drop_path.forward = lambda y: y * mask.view(2, 1, 1) / 0.7
        out = block(t)
        branch = block.mssa(block.norm1(t))
        torch.testing.assert_close(out[0], block.ista(block.norm2(t[0])))
        torch.testing.assert_close(out[1], block.ista(block.norm2(t[1] + branch[1] / 0.7)))
    with pytest.raises(ValueError, match="drop_path_rate"):
        small(drop_path_rate=1.0)


def test_pretrained_cfg_describes_the_model_built() -> None:
    from timm.data import resolve_data_config

    model = small(num_classes=7)
    config = resolve_data_config({}, model=model)
    assert tuple(config["input_size"]) == (3, 32, 32)
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 0.875
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(config["std"]) == (0.229, 0.224, 0.225)
    assert model.pretrained_cfg["num_classes"] == 7
    default = timm.create_model("crate_mae_tiny", pretrained=False)
    assert tuple(resolve_data_config({}, model=default)["input_size"]) == (3, 224, 224)


@pytest.mark.parametrize("enabled", [False, True])
def test_run_grad_checkpointing_is_applied_by_pretraining_and_fine_tuning(enabled: bool) -> None:
    from support import DEMO_RECIPE, TINY_MODEL

    from cratemae.recipe import load_recipe
    from cratemae.tasks.finetune import FinetuneTask
    from cratemae.tasks.pretrain import MAETask

    flag = f"run.grad_checkpointing={str(enabled).lower()}"
    recipe = load_recipe(DEMO_RECIPE, [*TINY_MODEL, flag])
    config = CrateMAEConfig(img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=2,
                            decoder_embed_dim=64, decoder_num_heads=4, decoder_depth=1)
    mae = CrateMAE(config)
    MAETask(recipe, mae)
    assert mae.grad_checkpointing is enabled and mae.encoder.grad_checkpointing is enabled
    encoder = CrateMAE(config).encoder
    FinetuneTask(recipe, encoder, config.to_dict(), num_classes=3)
    assert encoder.grad_checkpointing is enabled
