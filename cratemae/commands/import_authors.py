"""`cratemae import-authors`: import the authors' released checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cratemae.errors import BadInputError

__all__ = ["import_authors"]

# The names of cratemae.model.PRESETS, repeated here so that `--help` needs no torch.
PRESET_NAMES = ("crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large")


def import_authors(
    path: Annotated[
        Path,
        typer.Argument(metavar="PATH", help="The authors' .pth (MAE format or a bare state "
                       "dict) or .safetensors file.", show_default=False),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", metavar="CKPT", help="Directory to write: model.safetensors + "
                     "config.json, a checkpoint every command accepts.", show_default=False),
    ],
    preset: Annotated[
        str, typer.Option("--preset", help=f"Model size: {', '.join(PRESET_NAMES)}.")
    ] = "crate_mae_base",
    num_heads: Annotated[
        int | None,
        typer.Option("--num-heads", min=1, help="MSSA heads, encoder and decoder (default: "
                     "what the file records, else the preset's).", show_default=False),
    ] = None,
    ista_lambda: Annotated[
        float | None,
        typer.Option("--ista-lambda", help="ISTA sparsity penalty lambda (default: what the "
                     "file records, else 0.5 as in the released code).", show_default=False),
    ] = None,
) -> None:
    """Turn the authors' released checkpoint into a cratemae checkpoint.

    Reads pickles with torch.load(weights_only=True), allowing argparse.Namespace only: a
    file that needs anything else is refused. Widths, depths, patch and image size come
    from the tensors; the number of heads from --num-heads, the file, or the preset.

    Examples:
      $ cratemae import-authors crate_mae_base.pth --out imported/base
      $ cratemae import-authors weights.safetensors --out imported/tiny --preset crate_mae_tiny
      $ cratemae import-authors crate_mae_base.pth --out imported/base --ista-lambda 0.1
    """
    if preset not in PRESET_NAMES:
        raise BadInputError(f"--preset {preset}: expected one of {', '.join(PRESET_NAMES)}")
    if out.is_file():
        raise BadInputError(f"--out {out}: is a file; expected a directory")
    from cratemae.weights.authors_file import build_authors_model, read_authors_file
    from cratemae.weights.export import export_safetensors
    from cratemae.weights.load import IMAGENET_MEAN, IMAGENET_STD, LoadedModel

    weights = read_authors_file(path)
    overrides: dict[str, object] = {}
    if num_heads is not None:
        overrides.update(num_heads=num_heads, decoder_num_heads=num_heads)
    if ista_lambda is not None:
        overrides["ista_lambda"] = ista_lambda
    model = build_authors_model(weights, path, preset=preset, overrides=overrides)
    # The authors pre-trained with MAE's pipeline: ImageNet's mean and std.
    loaded = LoadedModel(model=model, weights_file=path, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         preprocessing_known=True)
    result = export_safetensors(loaded, out, encoder_only=False)
    c = model.config
    typer.echo(f"read {path} ({weights.kind}): width {c.embed_dim}, {c.num_heads} heads, "
               f"depth {c.depth}+{c.decoder_depth}, {c.img_size} px, patch {c.patch_size}, "
               f"ista_lambda {c.ista_lambda}")
    typer.echo(f"wrote {result.file} and {result.config_file}")
    typer.echo(f"sha256 {result.sha256}  {result.file.name}")
