"""Weights that are finite but overflow in float32 (one entry 3e38): every command that runs
the model on them says so in one `error:` line, exit 1, and writes nothing. They passed the
finite-weights check; reconstruct then printed "PSNR nan dB" and wrote a picture, export's
ONNX check compared NaN with NaN as no difference, and analyze died in a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import cli

from cratemae.checkpoints import write_model_weights
from cratemae.model import create_model
from cratemae.weights.graph import compare
from cratemae.weights.load import load_model


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("crate_mae_tiny", img_size=32, patch_size=8, embed_dim=64, num_heads=2,
                         depth=2, decoder_embed_dim=64, decoder_num_heads=2, decoder_depth=1)
    state = model.state_dict()
    state["encoder.blocks.0.mssa.u_proj.weight"].view(-1)[0] = 3e38
    assert all(torch.isfinite(t).all() for t in state.values())
    return write_model_weights(tmp_path_factory.mktemp("w") / "model.safetensors", state,
                               model.config.to_dict())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def _failed(run, message: str) -> None:
    assert run.exit_code == 1, run.output
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.output


def test_the_weights_overflow(overflowing) -> None:
    encoder = load_model(overflowing).encoder.eval()
    with torch.no_grad():
        assert not torch.isfinite(encoder.forward_features(torch.randn(1, 3, 32, 32))).all()


def test_reconstruct_says_the_reconstruction_is_not_finite(overflowing, image, tmp_path):
    out = tmp_path / "rec.png"
    run = cli("reconstruct", image, "--checkpoint", overflowing, "--out", out)
    _failed(run, "the model's reconstruction is not finite")
    assert not out.exists()


def test_analyze_says_the_tokens_are_not_finite(overflowing, image, tmp_path):
    out = tmp_path / "an"
    run = cli("analyze", "--checkpoint", overflowing, image, "--out", out)
    _failed(run, "the encoder's tokens are not finite")
    assert not (out / "layers.json").exists()


def test_the_export_check_refuses_non_finite_outputs(overflowing) -> None:
    """NaN - NaN is NaN, and max(0, NaN) is 0: the check passed an all-NaN graph."""
    from cratemae.errors import CrateMAEError

    encoder = load_model(overflowing).encoder
    with pytest.raises(CrateMAEError, match=r"^g: the model's own features are not finite at "
                       r"32x32 px .*; not written$"):
        compare(encoder.forward_features, encoder, [(2, 32, 32)], name="g")
    fine = load_model(overflowing)  # a graph that goes NaN where PyTorch does not
    fine.encoder.blocks[0].mssa.u_proj.weight.data.view(-1)[0] = 0.0
    with pytest.raises(CrateMAEError, match=r"^g: its output is not finite at 32x32 px, where "
                       r"PyTorch's is; not written$"):
        compare(lambda x: fine.encoder.forward_features(x) * float("nan"), fine.encoder,
                [(2, 32, 32)], name="g")


def test_export_onnx_of_overflowing_weights_writes_nothing(overflowing, tmp_path) -> None:
    out = tmp_path / "onnx"
    _failed(cli("export", overflowing, "--out", out, "--format", "onnx"),
            "the model's own features are not finite")
    assert not out.exists() or not any(out.iterdir())


def test_probe_refuses_non_finite_features_instead_of_scoring_chance(overflowing, tmp_path):
    """`probe --checkpoint` fitted on NaN features and reported top-1 10.0 on the demo data
    (chance), exit 0. It stops before fitting, naming the split and the sample."""
    from data_fixtures import make_shards
    from support import PROBE_DEMO_RECIPE

    make_shards(tmp_path / "d", [4, 4], prefix="train")
    make_shards(tmp_path / "v", [4], prefix="val")
    out = tmp_path / "probe"
    run = cli("probe", PROBE_DEMO_RECIPE, "--checkpoint", overflowing, "--out", out,
              "--set", f'data.train="{tmp_path / "d"}"', "--set", f'data.val="{tmp_path / "v"}"',
              "--set", "data.num_workers=0", "--set", "probe.num_classes=8",
              "--set", f'probe.cache_dir="{tmp_path / "cache"}"')
    _failed(run, "data.train: sample 0 (of 8) gave non-finite features")
    assert not (out / "probe.json").exists() and not any((tmp_path / "cache").glob("*"))
