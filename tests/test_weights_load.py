"""The one loader of weights (`cratemae.weights.load`): every layout a checkpoint may hold
loads through the one key mapper to the same weights, the image size may change, a mismatch
is one line naming the file, and every command reads weights through it."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from support import REPO, cli

from cratemae.checkpoints import write_model_weights
from cratemae.errors import BadInputError
from cratemae.model import CrateEncoder, CrateMAE, CrateMAEConfig
from cratemae.model.pos_embed import sincos_2d
from cratemae.recipe.schema import ModelSection
from cratemae.weights import load
from cratemae.weights.load import checkpoint_filter_fn, load_encoder, load_model

CONFIG = CrateMAEConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
CLASSES = 5

# Our names -> the authors' (Ma-Lab-Berkeley/CRATE, model/crate_ae/), written out here
# independently of cratemae.model.authors; the first rule that matches applies.
_TO_AUTHORS = [
    (r"^encoder\.blocks\.(\d+)\.norm1\.", r"blocks.\1.layers.0.0.norm."),
    (r"^encoder\.blocks\.(\d+)\.mssa\.u_proj\.weight$", r"blocks.\1.layers.0.0.fn.qkv.weight"),
    (r"^encoder\.blocks\.(\d+)\.mssa\.out_proj\.", r"blocks.\1.layers.0.0.fn.to_out.0."),
    (r"^encoder\.blocks\.(\d+)\.norm2\.", r"blocks.\1.layers.0.1.norm."),
    (r"^encoder\.blocks\.(\d+)\.ista\.dictionary$", r"blocks.\1.layers.0.1.fn.weight"),
    (r"^decoder_blocks\.(\d+)\.norm1\.", r"decoder_blocks.\1.layers.0.0.norm."),
    (r"^decoder_blocks\.(\d+)\.dictionary$", r"decoder_blocks.\1.layers.0.0.fn.weight"),
    (r"^decoder_blocks\.(\d+)\.norm2\.", r"decoder_blocks.\1.layers.0.1.norm."),
    (r"^decoder_blocks\.(\d+)\.mssa\.u_proj\.weight$",
     r"decoder_blocks.\1.layers.0.1.fn.qkv.weight"),
    (r"^decoder_blocks\.(\d+)\.mssa\.out_proj\.", r"decoder_blocks.\1.layers.0.1.fn.to_out.0."),
    (r"^encoder\.", ""),  # patch_embed, cls_token, norm
]


def authors_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, template in _TO_AUTHORS:
            new, n = re.subn(pattern, template, key)
            if n:
                key = new
                break
        out[key] = value
    d, tokens = CONFIG.embed_dim, 1 + CONFIG.num_patches
    # Their frozen tables and their never-used decoder_embed: to be left out.
    return {**out, "pos_embed": torch.zeros(1, tokens, d),
            "decoder_pos_embed": torch.zeros(1, tokens, d),
            "decoder_embed.weight": torch.zeros(d, d), "decoder_embed.bias": torch.zeros(d)}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def with_ema(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's checkpoint with a weight average: other values under `ema.`."""
    return {**state, **prefixed("ema.", {k: v + 1 for k, v in state.items()})}


@pytest.fixture(scope="module")
def mae() -> CrateMAE:
    torch.manual_seed(0)
    return CrateMAE(CONFIG).eval()


@pytest.fixture(scope="module")
def finetuned(mae: CrateMAE) -> CrateEncoder:
    """A fine-tuned classifier: the encoder with a trained head."""
    encoder = copy.deepcopy(mae.encoder)
    encoder.reset_classifier(CLASSES, "token")
    torch.nn.init.normal_(encoder.head.weight)
    return encoder


def mae_layouts(mae: CrateMAE) -> dict[str, dict[str, torch.Tensor]]:
    """Every layout that holds the whole autoencoder."""
    state = mae.state_dict()
    return {
        "cratemae": state,
        "ema": with_ema(state),
        "ddp": prefixed("module.", state),
        "compiled": prefixed("_orig_mod.", state),
        "ddp+compiled+ema": prefixed("module._orig_mod.", with_ema(state)),
        "authors": authors_layout(state),
    }


def encoder_layouts(finetuned: CrateEncoder) -> dict[str, dict[str, torch.Tensor]]:
    """Every layout that holds an encoder alone (with the head a fine-tune trained)."""
    state = finetuned.state_dict()
    return {
        "export --encoder-only": prefixed("encoder.", state),
        "fine-tune": state,
        "fine-tune+ema": with_ema(state),
        "ddp fine-tune+ema": prefixed("module.", with_ema(state)),
    }


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def no_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# --- the mapper, on state dicts in memory ---------------------------------------------------
def test_the_mapper_maps_every_autoencoder_layout_to_the_model_s_keys(mae) -> None:
    for name, state in mae_layouts(mae).items():
        assert same(checkpoint_filter_fn(state, CrateMAE(CONFIG)), mae.state_dict()), name
        assert same(checkpoint_filter_fn(state, CrateEncoder(CONFIG)),
                    mae.encoder.state_dict()), name


def test_the_mapper_maps_every_encoder_layout_keeping_the_head_only_for_a_classifier(
    finetuned,
) -> None:
    for name, state in encoder_layouts(finetuned).items():
        classifier = CrateEncoder(CONFIG, num_classes=CLASSES)
        assert same(checkpoint_filter_fn(state, classifier), finetuned.state_dict()), name
        backbone = CrateEncoder(CONFIG)
        assert same(checkpoint_filter_fn(state, backbone), no_head(finetuned.state_dict())), name


# --- loading files ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cratemae", "ema", "ddp", "compiled", "ddp+compiled+ema",
                                    "authors"])
def test_every_autoencoder_layout_loads_to_identical_weights(mae, tmp_path, layout) -> None:
    file = write_model_weights(tmp_path / "m.safetensors", mae_layouts(mae)[layout],
                               CONFIG.to_dict())
    loaded = load_model(file)
    assert isinstance(loaded.model, CrateMAE) and not loaded.model.training
    assert same(loaded.model.state_dict(), mae.state_dict())
    backbone = load_encoder(file)
    assert isinstance(backbone.model, CrateEncoder) and backbone.model.num_classes == 0
    assert same(backbone.encoder.state_dict(), mae.encoder.state_dict())


@pytest.mark.parametrize("layout", ["export --encoder-only", "fine-tune", "fine-tune+ema",
                                    "ddp fine-tune+ema"])
def test_every_encoder_layout_loads_the_trained_weights_not_the_average(
    finetuned, tmp_path, layout
) -> None:
    file = write_model_weights(tmp_path / "m.safetensors", encoder_layouts(finetuned)[layout],
                               CONFIG.to_dict())
    loaded = load_model(file)  # the classifier, head and all
    assert isinstance(loaded.model, CrateEncoder) and loaded.model.num_classes == CLASSES
    assert same(loaded.model.state_dict(), finetuned.state_dict())
    encoder, config = load_encoder(file)  # the backbone probe and finetune start from
    assert same(encoder.state_dict(), no_head(finetuned.state_dict()))
    assert config == CONFIG.to_dict()


def test_a_file_and_the_directory_holding_it_are_the_same_checkpoint(mae, tmp_path) -> None:
    file = write_model_weights(tmp_path / "ckpt" / "model.safetensors", mae.state_dict(),
                               CONFIG.to_dict())
    by_dir, by_file = load_model(tmp_path / "ckpt"), load_model(file)
    assert by_dir.weights_file == by_file.weights_file == file
    assert by_dir.path == tmp_path / "ckpt"
    assert same(by_dir.model.state_dict(), by_file.model.state_dict())
    assert load.checkpoint_digest(tmp_path / "ckpt") == load.checkpoint_digest(file)


def test_the_image_size_may_change_and_the_position_table_follows(mae, tmp_path) -> None:
    file = write_model_weights(tmp_path / "m.safetensors", mae.state_dict(), CONFIG.to_dict())
    section = ModelSection(img_size=64, depth=2)  # a field equal to the checkpoint's is fine
    loaded = load_encoder(file, section)
    encoder, config = loaded  # as probe and finetune take it
    assert loaded.config.img_size == config["img_size"] == 64 and encoder is loaded.encoder
    assert torch.equal(loaded.encoder.pos_embed, sincos_2d(64, 8, 8)[None])  # 8 x 8 patches
    assert same(loaded.encoder.state_dict(), mae.encoder.state_dict())
    assert loaded.encoder.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)


@pytest.mark.parametrize(("section", "message"), [
    (ModelSection(embed_dim=32), "model.embed_dim = 32, but {file} holds a model with "
                                 "embed_dim = 64"),
    (ModelSection(img_size=36), "model.img_size = 36: img_size 36 is not a multiple"),
])
def test_other_model_fields_must_agree_with_the_checkpoint(mae, tmp_path, section,
                                                            message) -> None:
    file = write_model_weights(tmp_path / "m.safetensors", mae.state_dict(), CONFIG.to_dict())
    with pytest.raises(BadInputError) as err:
        load_encoder(file, section)
    assert message.format(file=file) in str(err.value)


def _broken(mae: CrateMAE, how: str) -> tuple[dict[str, torch.Tensor], dict]:
    state, config = dict(mae.state_dict()), CONFIG.to_dict()
    if how == "shape":
        state["encoder.norm.weight"] = torch.ones(3)
    elif how == "missing":
        del state["encoder.blocks.1.ista.dictionary"]
    elif how == "config":
        config = {**config, "depth": 3}
    elif how == "decoder only":
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    elif how == "unknown authors key":
        state = {**authors_layout(state), "blocks.0.layers.0.2.fn.weight": torch.ones(1)}
    return state, config


@pytest.mark.parametrize(("how", "message"), [
    ("shape", "does not match the model: 1 shape mismatch: encoder.norm.weight"),
    ("missing", "does not match the model: 1 missing key: encoder.blocks.1.ista.dictionary"),
    ("config", "its configuration says depth = 3, its weights hold 2 such layers"),
    ("decoder only", "holds no encoder weights"),
    ("unknown authors key", "1 key(s) in no known layout: blocks.0.layers.0.2.fn.weight"),
])
@pytest.mark.parametrize("loader", [load_model, load_encoder])
def test_a_mismatch_is_one_error_line_naming_the_file(mae, tmp_path, how, message,
                                                      loader) -> None:
    state, config = _broken(mae, how)
    file = write_model_weights(tmp_path / "m.safetensors", state, config)
    with pytest.raises(BadInputError) as err:
        loader(file)
    text = str(err.value)
    assert text.startswith(f"{file}: ") and "\n" not in text
    if loader is load_encoder:  # the encoder alone: its keys are named without `encoder.`
        message = message.replace("encoder.", "")
    assert message in text


# --- every command reads weights through the one loader -----------------------------------
def test_the_commands_and_tasks_hold_the_loader_s_own_functions() -> None:
    from cratemae.tasks import finetune, probe
    from cratemae.weights import authors_file

    assert probe.load_encoder is finetune.load_encoder is load.load_encoder
    assert probe.checkpoint_digest is load.checkpoint_digest
    assert authors_file.checkpoint_filter_fn is load.checkpoint_filter_fn


@pytest.fixture(scope="module")
def command_inputs(mae, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 100, 50)).save(d / "image.png")
    from safetensors.torch import save_file

    save_file(authors_layout(mae.state_dict()), str(d / "authors.safetensors"))
    ckpt = write_model_weights(d / "ckpt" / "model.safetensors", mae.state_dict(),
                               CONFIG.to_dict())
    return {"ckpt": ckpt.parent, "image": d / "image.png", "authors": d / "authors.safetensors"}


COMMANDS = {
    "probe": ["probe", REPO / "recipes" / "probe" / "demo.toml", "--checkpoint", "{ckpt}",
              "--out", "{out}"],
    "finetune": ["finetune", REPO / "recipes" / "finetune" / "demo.toml", "--checkpoint",
                 "{ckpt}", "--out", "{out}"],
    "export": ["export", "{ckpt}", "--out", "{out}"],
    "reconstruct": ["reconstruct", "{image}", "--checkpoint", "{ckpt}", "--out", "{out}.png"],
    "analyze": ["analyze", "--checkpoint", "{ckpt}", "{image}", "--out", "{out}"],
    "import-authors": ["import-authors", "{authors}", "--out", "{out}", "--num-heads", "4"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_maps_keys_with_the_one_mapper(command_inputs, monkeypatch, tmp_path,
                                                     command) -> None:
    """The mapper is replaced by one that records the call and stops the command there."""
    from cratemae.weights import authors_file

    called: list[str] = []

    def spy(state: dict, model: torch.nn.Module, source: str = "") -> dict:
        called.append(type(model).__name__)
        raise BadInputError(f"{source}: reached the one key mapper")

    monkeypatch.setattr(load, "checkpoint_filter_fn", spy)
    monkeypatch.setattr(authors_file, "checkpoint_filter_fn", spy)  # the same function
    places = {k: str(v) for k, v in command_inputs.items()} | {"out": str(tmp_path / "out")}
    args = [str(a).format(**places) for a in COMMANDS[command]]
    run = cli(*args)
    assert run.exit_code == 2, run.output
    assert "reached the one key mapper" in run.stderr, run.stderr
    want = "CrateEncoder" if command in ("probe", "finetune", "analyze") else "CrateMAE"
    assert called == [want]
