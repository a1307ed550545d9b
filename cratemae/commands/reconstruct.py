"""`cratemae reconstruct`: show what the model makes of a masked image (stub until it lands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands.options import require_file
from cratemae.errors import BadInputError, NotBuiltError

__all__ = ["reconstruct"]


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
            help="Pre-trained checkpoint to use.",
            show_default=False,
        ),
    ] = None,
    mask_ratio: Annotated[
        float, typer.Option("--mask-ratio", help="Fraction of patches to hide, in [0, 1).")
    ] = 0.75,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random mask.")] = 0,
    out: Annotated[
        Path,
        typer.Option("--out", metavar="PATH", help="Image to write: original | masked | output."),
    ] = Path("reconstruction.png"),
) -> None:
    """Mask an image and show the model's reconstruction.

    Examples:
      $ cratemae reconstruct photo.jpg --checkpoint runs/base/last.pt
      $ cratemae reconstruct a.jpg b.jpg --checkpoint runs/base/last.pt --mask-ratio 0.9 --seed 1
      $ cratemae reconstruct photo.jpg --checkpoint runs/base/last.pt --out recon.png
    """
    if not 0 <= mask_ratio < 1:
        raise BadInputError(f"--mask-ratio {mask_ratio}: expected a value in [0, 1)")
    for image in images:
        require_file(image, "image")
    if checkpoint is not None:
        require_file(checkpoint, "checkpoint")
    raise NotBuiltError("cratemae reconstruct is not built yet")
