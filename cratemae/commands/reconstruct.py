"""`cratemae reconstruct`: show what the model makes of a masked image."""

from __future__ import annotations

import json
import tomllib
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cratemae.commands import console
from cratemae.errors import BadInputError
from cratemae.guard import special_kind
from cratemae.rundir import RunFiles

if TYPE_CHECKING:
    import torch

    from cratemae.weights.load import LoadedModel

__all__ = ["reconstruct"]

_CHUNK = 16  # images per forward pass
_DEFAULT_MASK_RATIO = 0.75  # MAE's, and the recipe's default


class Fit(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """How a picture is fitted to the model's square input: the `fit` values of
    `cratemae.data.transforms.image_to_tensor`."""

    short_side = "short-side"
    eval = "eval"


def reconstruct(
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE...", help="Image files to reconstruct.", show_default=False),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            metavar="CKPT",
            help="Checkpoint, run directory or exported weights with the decoder (default: "
            "the newest pre-training run under ./runs that finished or stopped).",
            show_default=False,
        ),
    ] = None,
    mask_ratio: Annotated[
        float | None,
        typer.Option("--mask-ratio", show_default=False,
                     help="Fraction of patches to hide, in [0, 1) (default: the ratio the "
                     "checkpoint was pre-trained with, else 0.75)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random mask.")] = 0,
    fit: Annotated[
        Fit,
        typer.Option(
            "--fit",
            help="How each picture becomes the model's square input. short-side: the short "
            "side resized to the model's size, the centre square kept (all of the short "
            "side is shown); eval: the evaluation crop (short side to size*256/224, then the "
            "centre square), exactly what probe, embed and analyze feed the model.",
        ),
    ] = Fit.short_side,
    out: Annotated[
        Path,
        typer.Option(
            "--out", metavar="PATH",
            help="Picture to write (.png, .jpg or .webp): a row per image, original | masked "
            "| reconstruction | reconstruction + visible, and a legend.",
        ),
    ] = Path("reconstruction.png"),
) -> None:
    """Mask an image and show the model's reconstruction.

    Prints, per image, the PSNR of the reconstruction over the hidden patches. Every image
    gets the same seeded mask. Images that cannot be read are reported and skipped; the
    exit status is then 2. Each picture is fitted to the model's input by --fit: by
    default its whole short side (a little more of it than the evaluation crop shows).

    Examples:
      $ cratemae reconstruct photo.jpg --checkpoint runs/base
      $ cratemae reconstruct a.jpg b.png --checkpoint runs/base --mask-ratio 0.9 --seed 1
      $ cratemae reconstruct photo.jpg --checkpoint exported/base --out recon.jpg
      $ cratemae reconstruct photo.jpg --checkpoint runs/base --fit eval
      $ cratemae reconstruct photo.jpg      # the newest pre-training run under ./runs
    """
    if mask_ratio is not None and not 0 <= mask_ratio < 1:
        raise BadInputError(f"--mask-ratio {mask_ratio}: expected a value in [0, 1)")
    from cratemae.guard import check_output
    from cratemae.viz.panel import picture_format

    picture_format(out)  # an unknown extension is refused before any work
    present = _present(images)
    loaded = _load(checkpoint)
    check_output(out, kind="file", reads=[*images, loaded.weights_file])
    if mask_ratio is None:
        mask_ratio = _trained_mask_ratio(loaded)
    from cratemae.data.transforms import image_to_tensor

    size = loaded.config.img_size
    pixels, names = [], []
    for image in present:
        try:  # pixels in [0, 1]: reconstruct() normalises them with the model's mean/std
            pixels.append(image_to_tensor(image, size, fit=fit.value))
            names.append(image.name)
        except BadInputError as err:
            console.error(str(err))
    if pixels:
        _run(loaded, pixels, names, mask_ratio=mask_ratio, seed=seed, out=out)
    failed = len(images) - len(pixels)
    if failed:
        raise BadInputError(f"{failed} of {len(images)} images could not be read")


def _present(images: list[Path]) -> list[Path]:
    """The images that are files; the others are named in an error line each (the run
    goes on, and exits 2 at the end), or, when none is, in the one error line (a FIFO,
    socket or device is never opened)."""
    problems = {}
    for image in images:
        kind = special_kind(image)
        if kind is not None or not image.is_file():
            problems[image] = f"is {kind}, not an image file" if kind else "image not found"
    present = [image for image in images if image not in problems]
    if not present:
        first, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BadInputError(f"{first}: {why}{more}; no image to reconstruct")
    for image, why in problems.items():
        console.error(f"{image}: {why}")
    return present


def _usable(weights: Path) -> bool:
    """A pre-training run's weights (they hold the decoder) of a run that finished or
    stopped (resumable), not one that failed or is still running; a run older than
    status.json counts."""
    from cratemae.checkpoints.resolve import run_dir_of
    from cratemae.weights.load import has_decoder

    run = run_dir_of(weights)
    status = RunFiles(run).status if run is not None else None
    if status is not None and status.is_file():
        try:
            state = json.loads(status.read_text(encoding="utf-8")).get("state")
        except (OSError, ValueError, AttributeError):
            return False
        if state not in ("finished", "stopped"):
            return False
    return has_decoder(weights)


def _probe_run(checkpoint: Path) -> None:
    """A probe run holds a linear head at most, never a decoder: say so, and name the
    checkpoint it probed, rather than that it is no run directory."""
    files = RunFiles(checkpoint)
    if checkpoint.is_dir() and files.probe.is_file() and not files.checkpoints.is_dir():
        try:
            probed = json.loads(files.probe.read_text(encoding="utf-8")).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            probed = None
        hint = f": give the checkpoint it probed, {probed}" if probed else ""
        raise BadInputError(f"{checkpoint}: a probe run, which holds no decoder (a probe "
                            f"keeps no weights of the model){hint}")


def _load(checkpoint: Path | None) -> LoadedModel:
    """The model to use: `checkpoint`, else the newest usable run's under ./runs."""
    from cratemae.checkpoints.resolve import resolve_checkpoint
    from cratemae.weights.load import load_model

    if checkpoint is None:
        # Only pre-training runs hold the decoder; the newest run is often a fine-tune.
        checkpoint = resolve_checkpoint(
            None, accept=_usable,
            wanted="pre-training run that finished or stopped (one whose weights hold "
                   "the decoder)")
        console.log(f"using {checkpoint} (the newest pre-training run under ./runs that "
                    "finished or stopped; --checkpoint chooses another)")
    else:
        _probe_run(checkpoint)
    loaded = load_model(checkpoint)
    if not hasattr(loaded.model, "decoder_blocks"):
        export = ("MAE ViT exports hold the encoder only (timm's layout): give the "
                  "pre-training run or its checkpoint" if loaded.config.family == "vit" else
                  "give a pre-training run (fine-tune and probe runs hold no decoder) or an "
                  "export made without --encoder-only")
        raise BadInputError(f"{loaded.weights_file}: holds only the encoder; reconstruct "
                            f"needs the decoder too: {export}")
    if not loaded.preprocessing_known:
        console.warn(f"{loaded.weights_file}: no record of the mean/std it was trained with; "
                     "assuming ImageNet's")
    return loaded


def _trained_mask_ratio(loaded: LoadedModel) -> float:
    """The mask ratio the weights were pre-trained with: their checkpoint's recipe's
    model.mask_ratio (the recipe's default when it sets none), else MAE's 0.75, said."""
    from cratemae.checkpoints.layout import META

    meta = loaded.weights_file.parent / META
    try:
        recipe = tomllib.loads(json.loads(meta.read_text(encoding="utf-8"))["recipe_toml"])
        ratio = float(recipe.get("model", {}).get("mask_ratio", _DEFAULT_MASK_RATIO))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        console.log(f"--mask-ratio {_DEFAULT_MASK_RATIO:g} (no record of the ratio "
                    f"{loaded.path} was trained with)")
        return _DEFAULT_MASK_RATIO
    if not 0 <= ratio < 1:
        return _DEFAULT_MASK_RATIO
    console.log(f"--mask-ratio {ratio:g}: the ratio {loaded.path} was pre-trained with")
    return ratio


def _run(loaded: LoadedModel, pixels: list[torch.Tensor], names: list[str], *,
         mask_ratio: float, seed: int, out: Path) -> None:
    import torch

    from cratemae.viz.panel import render_reconstructions
    from cratemae.viz.reconstruction import mask_noise, reconstruct

    batch = torch.stack(pixels)  # (B, 3, S, S)
    noise = mask_noise(loaded.config.num_patches, seed, batch.shape[0])  # (B, L)
    results = []
    for start in range(0, batch.shape[0], _CHUNK):
        results += reconstruct(
            loaded.model, batch[start : start + _CHUNK], mean=loaded.mean, std=loaded.std,
            mask_ratio=mask_ratio, noise=noise[start : start + _CHUNK],
        )
    norm_pix = loaded.config.norm_pix_loss
    if norm_pix:
        typer.echo("norm_pix_loss model: reconstructions are shown with each patch's true "
                   "mean and variance (as in MAE's demo)")
    for name, rec in zip(names, results, strict=True):
        hidden = int(rec.mask.sum())
        if hidden:
            typer.echo(f"{name}: PSNR {rec.psnr:.2f} dB over {hidden} hidden patches")
        else:  # --mask-ratio 0 (or too few patches to hide one): nothing to score
            typer.echo(f"{name}: no hidden patches at --mask-ratio {mask_ratio:g}, so no PSNR")
    path = render_reconstructions(list(zip(names, results, strict=True)), out,
                                  mask_ratio=mask_ratio, norm_pix=norm_pix,
                                  patch_size=loaded.config.patch_size)
    typer.echo(f"wrote {path}")
