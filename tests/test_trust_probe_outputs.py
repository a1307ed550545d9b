"""reconstruct and analyze follow the checkpoint (its mask ratio, a run that finished), number
layers from 0, and check where they write before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import cli

from cratemae.checkpoints import collect_rng_state, save_checkpoint
from cratemae.model import create_model

RECIPE = '[model]\nmask_ratio = 0.5\n[data]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n'


def pretrain_run(where: Path, *, state: str = "finished") -> Path:
    """A pre-training run as `cratemae pretrain` leaves it: recipe.toml, status.json and one
    checkpoint of a 1-layer model (32 px, patch 8: 16 patches) trained at mask ratio 0.5."""
    torch.manual_seed(0)
    mae = create_model("crate_mae_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1,
                       num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    where.mkdir(parents=True)
    (where / "recipe.toml").write_text(RECIPE)
    (where / "status.json").write_text(json.dumps({"state": state}))
    meta = {"epoch": 0, "samples_seen": 0, "recipe_hash": "x", "end_of_epoch": False,
            "data_position": {"epoch": 0, "batch": 1}, "recipe_toml": RECIPE}
    return save_checkpoint(where, step=1, model_state=mae.state_dict(),
                           model_config=mae.config.to_dict(), optimizer_state={},
                           scaler_state={}, rng_states=[collect_rng_state()], meta=meta)


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "photo.png")
    return tmp_path


def test_reconstruct_masks_as_the_checkpoint_was_trained(here):
    pretrain_run(here / "runs" / "demo")
    result = cli("reconstruct", "photo.png", "--checkpoint", "runs/demo")
    assert result.exit_code == 0, result.output
    assert "--mask-ratio 0.5: the ratio" in result.stderr
    assert "over 8 hidden patches" in result.stdout  # half of 16
    asked = cli("reconstruct", "photo.png", "--checkpoint", "runs/demo", "--mask-ratio", "0.75")
    assert asked.exit_code == 0 and "over 12 hidden patches" in asked.stdout


def test_reconstruct_takes_the_newest_run_that_did_not_fail_and_says_which(here):
    pretrain_run(here / "runs" / "good")
    pretrain_run(here / "runs" / "broken", state="failed")  # saved later: the newest
    result = cli("reconstruct", "photo.png")
    assert result.exit_code == 0, result.output
    assert "using runs/good/checkpoints/" in result.stderr and "finished or stopped" in (
        result.stderr)


def test_reconstruct_of_a_probe_run_says_it_holds_no_decoder(here):
    probe = here / "runs" / "demo-probe"
    probe.mkdir(parents=True)
    (probe / "recipe.toml").write_text("")
    (probe / "probe.json").write_text(json.dumps({"checkpoint": "runs/demo"}))
    result = cli("reconstruct", "photo.png", "--checkpoint", "runs/demo-probe")
    assert result.exit_code == 2, result.output
    assert "a probe run, which holds no decoder" in result.stderr
    assert "runs/demo" in result.stderr and "not a checkpoint" not in result.stderr


@pytest.mark.parametrize(("out", "said"), [
    ("photo.png", "is the input"),
    ("fifo.png", "is a FIFO"),
    ("runs/demo/checkpoints/x.png", "inside the checkpoints"),
    ("photo.png/x.png", "not a directory"),
])
def test_reconstruct_refuses_a_bad_out_before_any_work(here, out, said):
    pretrain_run(here / "runs" / "demo")
    os.mkfifo(here / "fifo.png")
    before = (here / "photo.png").read_bytes()
    result = cli("reconstruct", "photo.png", "--checkpoint", "runs/demo", "--out", out)
    assert result.exit_code == 2, result.output
    assert said in result.stderr and "PSNR" not in result.stdout
    assert (here / "photo.png").read_bytes() == before


def test_analyze_numbers_layers_from_0(here):
    pytest.importorskip("matplotlib")
    pretrain_run(here / "runs" / "demo")
    result = cli("analyze", "photo.png", "--checkpoint", "runs/demo", "--pca-layer", "0",
                 "--out", "a")
    assert result.exit_code == 0, result.output
    assert "PCA of the patch features of layer 0" in result.stderr
    layers = json.loads((here / "a" / "layers.json").read_text())
    assert layers["pca_layer"] == 0
    assert [(e["depth"], e["layer"], e["tokens"]) for e in layers["layers"]] == [
        (0, None, "input to layer 0"), (1, 0, "output of layer 0")]
    for bad in ("1", "-2"):  # one layer: 0 (or -1) only
        wrong = cli("analyze", "photo.png", "--checkpoint", "runs/demo", "--pca-layer", bad)
        assert wrong.exit_code == 2 and "layers 0..0" in wrong.stderr


@pytest.mark.parametrize(("out", "said"), [
    ("runs/demo/checkpoints/new", "inside the checkpoints"),
    (".", "holds the input"),
    ("photo.png", "is a file"),
])
def test_analyze_refuses_a_bad_out_before_any_work(here, out, said):
    pytest.importorskip("matplotlib")
    pretrain_run(here / "runs" / "demo")
    result = cli("analyze", "photo.png", "--checkpoint", "runs/demo", "--out", out)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert not any(name.endswith("layers.json") for _, _, files in os.walk(here)
                   for name in files)
