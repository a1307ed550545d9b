"""One image-to-tensor path and one pixel normalisation: `reconstruct` (at `--fit eval`),
`analyze` (files and --data) and the evaluation loader give the model the same tensor for
the same file; `normalize` / `unnormalize` are the plain formulas, to the bit, and what
`reconstruct` and `analyze` draw is back in the image's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import cli

import cratemae.analysis
import cratemae.viz.reconstruction
from cratemae.checkpoints import write_model_weights
from cratemae.commands.reconstruct import Fit
from cratemae.data import build_loader, eval_transform
from cratemae.data.decode import read_image_file
from cratemae.data.transforms import (
    FIT_EVAL,
    FIT_SHORT_SIDE,
    FITS,
    fit_image,
    image_to_tensor,
    normalize,
    unnormalize,
)
from cratemae.errors import BadInputError
from cratemae.model import CrateMAE, CrateMAEConfig
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD, DataSection

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# --- normalize / unnormalize ----------------------------------------------------------------
def test_normalize_is_the_plain_formula_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    raw = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    assert torch.equal(normalize(raw, MEAN, STD), (raw.float() / 255.0 - m) / s)
    unit = torch.rand(4, 3, 8, 8, generator=g)
    assert torch.equal(normalize(unit, MEAN, STD), (unit - m) / s)
    wide = 3 * torch.randn(2, 3, 8, 8, generator=g)  # a model's output overshoots [0, 1]
    assert torch.equal(unnormalize(wide, MEAN, STD), (wide * s + m).clamp(0, 1))
    assert normalize(raw[0], MEAN, STD).shape == (3, 8, 8)  # unbatched too


def test_unnormalize_undoes_normalize() -> None:
    unit = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(unnormalize(normalize(unit, MEAN, STD), MEAN, STD), unit)


# --- the one image path ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 57 x 40 PNG of smooth colour ramps with a sharp square: every crop differs."""
    folder = tmp_path_factory.mktemp("photo")
    y, x = np.mgrid[0:40, 0:57]
    rgb = np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)
    rgb[5:15, 3:13] = (255, 255, 0)
    path = folder / "photo.png"  # PNG: the loader's JPEG draft decode does not apply
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CrateMAE(CrateMAEConfig(img_size=SIZE, patch_size=8, embed_dim=64, depth=2,
                                    num_heads=4, decoder_embed_dim=64, decoder_depth=1,
                                    decoder_num_heads=4))
    file = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return write_model_weights(file, model.state_dict(), model.config.to_dict())


def test_the_eval_fit_is_the_evaluation_transform(photo) -> None:
    rgb = read_image_file(photo)
    by_eval = eval_transform(SIZE, MEAN, STD)(rgb, np.random.default_rng(0))
    assert torch.equal(image_to_tensor(photo, SIZE, MEAN, STD), by_eval)
    assert torch.equal(image_to_tensor(rgb, SIZE, MEAN, STD, fit=FIT_EVAL), by_eval)
    pixels = image_to_tensor(photo, SIZE, fit=FIT_EVAL)  # no mean/std: in [0, 1]
    assert torch.equal(pixels, fit_image(rgb, SIZE, FIT_EVAL).float() / 255)
    assert torch.equal(normalize(pixels, MEAN, STD), by_eval)


def test_the_short_side_fit_keeps_the_whole_short_side(photo) -> None:
    rgb = read_image_file(photo)
    short = fit_image(rgb, SIZE, FIT_SHORT_SIDE)
    evaluated = fit_image(rgb, SIZE, FIT_EVAL)
    assert short.shape == evaluated.shape == (3, SIZE, SIZE) and short.dtype == torch.uint8
    assert not torch.equal(short, evaluated)
    # The whole height of a landscape picture: the top row is the picture's top row.
    top = np.asarray(rgb.resize((round(57 * SIZE / 40), SIZE), Image.Resampling.BICUBIC))
    left = (top.shape[1] - SIZE) // 2
    assert np.array_equal(short.permute(1, 2, 0).numpy(), top[:, left:left + SIZE])
    with pytest.raises(ValueError, match="fit 'whole'"):
        fit_image(rgb, SIZE, "whole")


def test_the_reconstruct_option_names_the_fits() -> None:
    assert {f.value for f in Fit} == set(FITS)


def spy_reconstruct(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def spy(model, pixels, **kwargs):
        seen.append(pixels)
        raise BadInputError("spied")

    monkeypatch.setattr(cratemae.viz.reconstruction, "reconstruct", spy)
    return seen


@pytest.mark.parametrize("fit", [None, "eval", "short-side"])
def test_reconstruct_feeds_the_model_image_to_tensor_s_pixels(photo, checkpoint, tmp_path,
                                                               monkeypatch, fit) -> None:
    seen = spy_reconstruct(monkeypatch)
    args = ["--fit", fit] if fit else []
    run = cli("reconstruct", photo, "--checkpoint", checkpoint, "--out", tmp_path / "r.png",
              *args)
    assert run.exit_code == 2 and "spied" in run.stderr, run.output
    expected = image_to_tensor(photo, SIZE, fit=fit or FIT_SHORT_SIDE)  # default: short side
    assert torch.equal(seen[0], expected[None])


def test_analyze_and_evaluation_see_what_reconstruct_sees_at_fit_eval(
    photo, checkpoint, tmp_path, monkeypatch
) -> None:
    """One file, three ways in: analyze's image files, analyze's --data (the evaluation
    loader: what probe, embed and the monitor read) and reconstruct --fit eval."""
    pytest.importorskip("matplotlib")
    batches: list[torch.Tensor] = []

    def spy(model, images, **kwargs):
        batches.extend(images)
        raise BadInputError("spied")

    monkeypatch.setattr(cratemae.analysis, "analyze", spy)
    for source in ([photo], ["--data", photo.parent]):
        run = cli("analyze", *source, "--checkpoint", checkpoint, "--out", tmp_path / "a")
        assert run.exit_code == 2 and "spied" in run.stderr, run.output
    by_file, by_data = batches
    seen = spy_reconstruct(monkeypatch)
    cli("reconstruct", photo, "--checkpoint", checkpoint, "--out", tmp_path / "r.png",
        "--fit", "eval")
    by_reconstruct = normalize(seen[0], IMAGENET_MEAN, IMAGENET_STD)  # as reconstruct() does
    assert by_file.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(by_file, by_data)
    assert torch.equal(by_file, by_reconstruct)
    assert torch.equal(by_file[0], image_to_tensor(photo, SIZE, IMAGENET_MEAN, IMAGENET_STD))


def test_the_evaluation_loader_gives_image_to_tensor_s_tensor(photo) -> None:
    section = DataSection(val=str(photo.parent), batch_size=4, num_workers=0, mean=MEAN,
                          std=STD)
    loader = build_loader(section, split="val", labels=False, img_size=SIZE, seed=0, epoch=0)
    (batch,) = list(loader)
    assert torch.equal(batch.model_input("cpu")[0], image_to_tensor(photo, SIZE, MEAN, STD))


# --- the pair's users map pixels back for display -------------------------------------------
class PerfectMAE(torch.nn.Module):
    """Stands in for a `CrateMAE` that predicts every patch of its (normalised) input
    exactly, and hides the left half of the patches."""

    def __init__(self, config: CrateMAEConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, imgs: torch.Tensor, *, mask_ratio: float, noise: torch.Tensor):
        from types import SimpleNamespace

        from cratemae.model import patchify

        pred = patchify(imgs, self.config.patch_size)  # (B, L, p*p*3)
        mask = (torch.arange(pred.shape[1]) % self.config.grid_size < 2).float()
        return SimpleNamespace(pred=pred, mask=mask.expand(pred.shape[0], -1))


def test_a_perfect_prediction_reconstructs_the_original_pixels(photo) -> None:
    from cratemae.viz.reconstruction import reconstruct

    config = CrateMAEConfig(img_size=SIZE, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                            decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    pixels = image_to_tensor(photo, SIZE, fit=FIT_EVAL)[None]  # (1, 3, S, S) in [0, 1]
    (rec,) = reconstruct(PerfectMAE(config), pixels, mean=MEAN, std=STD, mask_ratio=0.5,
                         noise=torch.zeros(1, config.num_patches))
    torch.testing.assert_close(rec.prediction, pixels[0], atol=1e-6, rtol=0)
    assert rec.psnr > 100


def test_analyze_draws_the_images_in_their_own_pixels(photo) -> None:
    from cratemae.analysis import analyze
    from cratemae.weights.load import LoadedModel

    torch.manual_seed(0)
    config = CrateMAEConfig(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    model = LoadedModel(CrateMAE(config).encoder.eval(), Path("random"), MEAN, STD, True)
    pixels = image_to_tensor(photo, SIZE, fit=FIT_EVAL)  # (3, S, S) in [0, 1]
    result = analyze(model, [normalize(pixels, MEAN, STD)[None]], names=["photo"],
                     pca_layer=-1, device=torch.device("cpu"))
    shown = result.pictures[0].image  # (S, S, 3)
    np.testing.assert_allclose(shown, pixels.permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)
