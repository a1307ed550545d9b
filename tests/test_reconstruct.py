"""`cratemae reconstruct` on real photographs (scikit-image's samples) in every format and
mode a user may have: the picture, the PSNR it prints, the seeded mask, bad images."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import cli

from cratemae.checkpoints import write_model_weights
from cratemae.data.transforms import FIT_SHORT_SIDE, image_to_tensor
from cratemae.model import create_model, patchify
from cratemae.viz.panel import LEGEND_HEIGHT, MIN_PANEL, _legend
from cratemae.viz.reconstruction import _as_image_patches

skimage_data = pytest.importorskip("skimage.data")
GAP, TEXT = 8, 22  # the panel layout's spacing and caption height
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """JPEG, PNG (greyscale), WebP, RGBA PNG, and a JPEG stored sideways with an EXIF
    orientation tag (6: display rotated 90 degrees clockwise)."""
    d = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(skimage_data.astronaut())
    paths = {k: d / n for k, n in [("jpeg", "astronaut.jpg"), ("grey", "camera.png"),
                                   ("webp", "coffee.webp"), ("rgba", "chelsea-rgba.png"),
                                   ("exif", "rotated.jpg")]}
    astronaut.save(paths["jpeg"], quality=95)
    Image.fromarray(skimage_data.camera()).save(paths["grey"])
    Image.fromarray(skimage_data.coffee()).save(paths["webp"], quality=90)
    cat = Image.fromarray(skimage_data.chelsea()).convert("RGBA")
    alpha = np.zeros(cat.size[::-1], dtype=np.uint8)
    alpha[:, alpha.shape[1] // 2 :] = 255  # left half fully transparent
    cat.putalpha(Image.fromarray(alpha))
    cat.save(paths["rgba"])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    astronaut.crop((0, 0, 512, 300)).save(paths["exif"], exif=exif, quality=95)
    return paths


def panels(png: Path, size: int, row: int) -> list[np.ndarray]:
    """The four panels of one row of a written figure, at model resolution, in [0, 1]."""
    scale = math.ceil(MIN_PANEL / size)
    side = size * scale
    figure = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
    top = TEXT + row * (TEXT + side + GAP) + TEXT
    return [figure[top : top + side : scale, GAP + c * (side + GAP) :][:, : side : scale]
            for c in range(4)]


def hidden_patches(num_patches: int, seed: int, mask_ratio: float) -> np.ndarray:
    """MAE's masking, written out: the patches whose noise rank is >= the kept count."""
    noise = torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed))[0]
    rank = torch.argsort(torch.argsort(noise))
    return (rank >= int(num_patches * (1 - mask_ratio))).numpy()


def test_every_kind_of_photo_is_reconstructed(demo_checkpoint, photos, tmp_path) -> None:
    out = tmp_path / "figure.png"
    run = cli("reconstruct", *photos.values(), "--checkpoint", demo_checkpoint,
                   "--seed", 3, "--mask-ratio", 0.5, "--out", out)
    assert run.exit_code == 0, run.output
    lines = [line for line in run.stdout.splitlines() if "PSNR" in line]
    assert [line.split(":")[0] for line in lines] == [p.name for p in photos.values()]
    figure = Image.open(out)
    side = 32 * math.ceil(MIN_PANEL / 32)
    assert figure.size == (4 * side + 5 * GAP,
                           TEXT + 5 * (TEXT + side + GAP) + GAP + LEGEND_HEIGHT)


def test_printed_psnr_is_that_of_the_picture_over_the_seeded_mask(
    demo_checkpoint, photos, tmp_path
) -> None:
    out = tmp_path / "figure.png"
    run = cli("reconstruct", photos["jpeg"], "--checkpoint", demo_checkpoint,
                   "--seed", 7, "--out", out)
    assert run.exit_code == 0, run.output
    printed = float(run.stdout.split("PSNR ")[1].split(" dB")[0])
    original, masked, prediction, pasted = panels(out, 32, row=0)
    # no --mask-ratio: the demo recipe's 0.5, which the checkpoint was pre-trained with
    hidden = np.kron(hidden_patches(64, seed=7, mask_ratio=0.5).reshape(8, 8),
                     np.ones((4, 4))).astype(bool)  # patch 4 px, 8 x 8 grid
    expected = np.asarray(image_to_tensor(photos["jpeg"], 32, fit=FIT_SHORT_SIDE).permute(1, 2, 0))
    assert np.abs(original - expected).max() <= 0.5 / 255  # the panel is the model's input
    assert np.all(masked[hidden] == 128 / 255)
    assert np.array_equal(pasted[~hidden], original[~hidden])
    assert np.array_equal(pasted[hidden], prediction[hidden])
    mse = ((prediction - original)[hidden] ** 2).mean()
    assert abs(10 * math.log10(1 / mse) - printed) < 0.05  # 8-bit rounding of the PNG


def test_the_same_seed_gives_the_same_picture(demo_checkpoint, photos, tmp_path) -> None:
    figures = []
    for seed in (0, 0, 1):
        out = tmp_path / f"{len(figures)}.png"
        assert cli("reconstruct", photos["grey"], "--checkpoint", demo_checkpoint,
                        "--seed", seed, "--out", out).exit_code == 0
        figures.append(out.read_bytes())
    assert figures[0] == figures[1] != figures[2]


def test_images_are_upright_rgb_squares(photos) -> None:
    rotated = image_to_tensor(photos["exif"], 48, fit=FIT_SHORT_SIDE)
    with Image.open(photos["jpeg"]) as im:  # the same crop, turned by hand
        upright = im.crop((0, 0, 512, 300)).transpose(Image.Transpose.ROTATE_270)
        upright.save(photos["exif"].with_name("upright.png"))
    torch.testing.assert_close(rotated, image_to_tensor(photos["exif"].with_name("upright.png"),
                                                        48, fit=FIT_SHORT_SIDE),
                               atol=0.1, rtol=0)  # JPEG noise only: a wrong turn is far off
    grey = image_to_tensor(photos["grey"], 48, fit=FIT_SHORT_SIDE)
    assert grey.shape == (3, 48, 48) and torch.equal(grey[0], grey[1])
    rgba = image_to_tensor(photos["rgba"], 48, fit=FIT_SHORT_SIDE)
    assert torch.all(rgba[:, :, :20] == 1.0)  # the transparent half, over white
    assert not torch.all(rgba[:, :, 28:] == 1.0)


def test_unreadable_and_missing_images_are_reported_and_the_rest_processed(
    demo_checkpoint, photos, tmp_path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "figure.png"
    run = cli("reconstruct", tmp_path / "missing.jpg", photos["webp"], broken,
                   "--checkpoint", demo_checkpoint, "--out", out)
    assert run.exit_code == 2
    err = run.stderr.splitlines()
    assert f"error: {tmp_path / 'missing.jpg'}: image not found" in err
    assert any(line.startswith(f"error: {broken}: cannot read image") for line in err)
    assert err[-1] == "error: 2 of 3 images could not be read"
    assert "coffee.webp: PSNR" in run.stdout
    assert Image.open(out).height == TEXT + (TEXT + 32 * 7 + GAP) + GAP + LEGEND_HEIGHT


def test_without_checkpoint_the_newest_run_is_used(demo_checkpoint, photos, tmp_path,
                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = cli("reconstruct", photos["jpeg"])
    assert run.exit_code == 2
    assert run.stderr == ("error: no --checkpoint given and no pre-training run that finished "
                          "or stopped (one whose weights hold the decoder) under ./runs: pass "
                          "--checkpoint CKPT\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_checkpoint.parent.parent)
    run = cli("reconstruct", photos["jpeg"])
    assert run.exit_code == 0, run.output
    assert "using runs/demo/checkpoints/" in run.stderr
    assert (tmp_path / "reconstruction.png").is_file()


def test_exported_weights_are_accepted_but_not_the_encoder_alone(
    demo_checkpoint, photos, tmp_path
) -> None:
    for extra in ([], ["--encoder-only"]):
        out = tmp_path / f"export{len(extra)}"
        assert cli("export", demo_checkpoint, "--out", out, *extra).exit_code == 0
        run = cli("reconstruct", photos["jpeg"], "--checkpoint", out,
                       "--out", tmp_path / "figure.png")
        assert run.exit_code == (2 if extra else 0), run.output
    assert "holds only the encoder" in run.stderr


def test_norm_pix_predictions_get_each_patch_mean_and_variance_back() -> None:
    imgs = torch.randn(2, 3, 16, 16)
    target = patchify(imgs, 4)  # (2, 16, 48)
    standardised = (target - target.mean(-1, keepdim=True)) / (
        target.var(-1, keepdim=True) + 1e-6
    ) ** 0.5
    torch.testing.assert_close(_as_image_patches(standardised, imgs, 4, norm_pix=True), target)
    assert _as_image_patches(standardised, imgs, 4, norm_pix=False) is standardised


def test_norm_pix_model_says_so(photos, tmp_path) -> None:
    model = create_model("crate_mae_tiny", img_size=32, patch_size=4, embed_dim=32, depth=1,
                         num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=2, norm_pix_loss=True)
    weights = write_model_weights(tmp_path / "model.safetensors", model.state_dict(),
                                  model.config.to_dict())
    run = cli("reconstruct", photos["jpeg"], "--checkpoint", weights,
                   "--out", tmp_path / "figure.png")
    assert run.exit_code == 0, run.output
    assert "shown with each patch's true mean and variance" in run.stdout
    assert "assuming ImageNet's" in run.stderr  # a bare weights file records no mean/std


def test_without_checkpoint_a_newer_finetune_run_is_passed_over(demo_checkpoint, photos,
                                                                tmp_path, monkeypatch) -> None:
    """The README's sequence: pretrain, then fine-tune; the fine-tune run is newer but holds
    no decoder, so reconstruct takes the pre-training run and says so."""
    from cratemae.recipe import load_recipe
    from cratemae.tasks.finetune import finetune

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/finetune/demo.toml",
                         ["schedule.max_steps=1", "data.batch_size=8"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_checkpoint.parent.parent)
    finetune(recipe, demo_checkpoint, run_dir=tmp_path / "runs" / "demo-finetune")
    run = cli("reconstruct", photos["jpeg"])
    assert run.exit_code == 0, run.output
    assert "using runs/demo/checkpoints/" in run.stderr
    assert "newest pre-training run" in run.stderr


def test_out_extension_chooses_the_format_and_unknown_ones_are_refused(
        demo_checkpoint, photos, tmp_path) -> None:
    for name, magic in (("x.jpg", b"\xff\xd8\xff"), ("x.JPEG", b"\xff\xd8\xff"),
                        ("x.png", b"\x89PNG"), ("x.webp", b"RIFF")):
        run = cli("reconstruct", photos["jpeg"], "--checkpoint", demo_checkpoint,
                       "--out", tmp_path / name)
        assert run.exit_code == 0, run.output
        assert (tmp_path / name).read_bytes().startswith(magic), name
    run = cli("reconstruct", photos["jpeg"], "--checkpoint", demo_checkpoint,
                   "--out", tmp_path / "x.gif")
    assert run.exit_code == 2
    assert run.stderr == (f"error: --out {tmp_path / 'x.gif'}: unknown picture format '.gif'; "
                          "name it .png, .jpg, .jpeg or .webp\n")
    assert not (tmp_path / "x.gif").exists()


def test_mask_ratio_zero_prints_no_nan_and_the_legend_is_drawn(demo_checkpoint, photos,
                                                               tmp_path) -> None:
    out = tmp_path / "figure.png"
    run = cli("reconstruct", photos["jpeg"], "--checkpoint", demo_checkpoint,
                   "--mask-ratio", 0, "--out", out)
    assert run.exit_code == 0, run.output
    assert "nan" not in run.output.lower()
    assert "astronaut.jpg: no hidden patches at --mask-ratio 0, so no PSNR" in run.stdout
    legend = np.asarray(Image.open(out).convert("L"))[-LEGEND_HEIGHT:]
    assert (legend < 128).sum() > 500  # four lines of dark text under the last row
    text = " ".join(_legend(32, 4))
    assert "Model input: 32x32 px, patches of 4x4 px" in text
    assert "on visible patches it is unconstrained" in text
    for column in ("original:", "masked:", "reconstruction:", "reconstruction + visible:"):
        assert column in text


def test_no_image_at_all_is_one_error_line(tmp_path) -> None:
    """A missing image or a FIFO alone: one `error:` line naming it, before any weights are
    read (it was two lines, the second "no image to reconstruct")."""
    os.mkfifo(tmp_path / "pipe.png")
    for image, why in [(tmp_path / "missing.jpg", "image not found"),
                       (tmp_path / "pipe.png", "is a FIFO, not an image file")]:
        run = cli("reconstruct", image, "--checkpoint", tmp_path / "nothing", "--out",
                  tmp_path / "r.png")
        assert run.exit_code == 2
        assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
            f"error: {image}: {why}; no image to reconstruct"]
