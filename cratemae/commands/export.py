"""`cratemae export`: write a checkpoint's weights for other tools."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import CheckpointArg
from cratemae.errors import BadInputError

if TYPE_CHECKING:
    from cratemae.weights.load import LoadedModel

__all__ = ["ExportFormat", "export"]


class ExportFormat(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """The file formats `cratemae export` writes."""

    safetensors = "safetensors"
    onnx = "onnx"


def export(
    checkpoint: CheckpointArg,
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Directory to write.", show_default=False),
    ],
    format_: Annotated[
        ExportFormat, typer.Option("--format", help="File format to write.")
    ] = ExportFormat.safetensors,
    encoder_only: Annotated[
        bool, typer.Option("--encoder-only", help="Leave out the decoder (for downstream use).")
    ] = False,
) -> None:
    """Export weights for other tools.

    CKPT is a checkpoint directory, a run directory (its latest checkpoint) or a weights
    file. safetensors: DIR/model.safetensors, DIR/config.json and a model card DIR/README.md,
    in timm's Hub layout: every cratemae command reads DIR, and timm loads it with
    timm.create_model("local-dir:DIR", pretrained=True) after
    import cratemae.weights.timm_models (or "hf-hub:USER/REPO" once uploaded).
    MAE ViT: the encoder only, as timm's own vit_* architecture (no cratemae import).
    onnx: DIR/model.onnx, the encoder's forward_features with a dynamic batch dimension,
    checked against PyTorch with onnxruntime when it is installed.

    Examples:
      $ cratemae export runs/base --out exported/base
      $ cratemae export runs/base/checkpoints/step-000100000 --out exported/base --encoder-only
      $ cratemae export runs/base --out exported/base-onnx --format onnx
    """
    if not checkpoint.exists():
        raise BadInputError(f"{checkpoint}: checkpoint not found")
    _check_out(checkpoint, out)
    from cratemae.weights.load import load_model

    loaded = load_model(checkpoint)  # checks the weights against their configuration
    if format_ is ExportFormat.onnx:
        _export_onnx(loaded, out)
        return
    from cratemae.weights.export import export_safetensors

    result = export_safetensors(loaded, out, encoder_only=encoder_only)
    what = "encoder only" if result.encoder_only else "encoder and decoder"
    if loaded.config.family == "vit":
        what = "encoder only, in timm's VisionTransformer layout"
        if hasattr(loaded.model, "decoder_blocks") and not encoder_only:
            console.log("MAE ViT: the decoder is left out (timm's ViT has none); reconstruct "
                        "reads the checkpoint itself")
    typer.echo(f"wrote {result.file} ({what}), {result.config_file} and {result.card_file}")
    typer.echo(f"sha256 {result.sha256}  {result.file.name}")


def _export_onnx(loaded: LoadedModel, out: Path) -> None:
    """model.onnx, checked before it replaces anything, then config.json describing it."""
    from cratemae.checkpoints.files import file_digest
    from cratemae.weights.export import write_config_json
    from cratemae.weights.onnx import ONNX_TOLERANCE, export_onnx

    result = export_onnx(loaded.encoder, out / "model.onnx")  # CrateMAEError over tolerance
    file = result.file
    digest = file_digest(file)["sha256"]
    io = {"input": "images (batch, C, H, W)", "output": "features (batch, 1 + L, d)"}
    config_file = write_config_json(out, loaded, file=file, sha256=digest,
                                    extra={"encoder_only": True, "onnx": io})
    typer.echo(f"wrote {file} (encoder forward_features, dynamic batch) and {config_file}")
    typer.echo(f"sha256 {digest}  {file.name}")
    if result.unchecked is not None:
        console.warn(f"not checked: {result.unchecked}")
        return
    typer.echo(f"checked with onnxruntime: max abs difference {result.max_abs:.2e} "
               f"(tolerance {ONNX_TOLERANCE:.0e} x (1 + |x|))")


def _check_out(checkpoint: Path, out: Path) -> None:
    """Where the export goes, checked before anything is read (exit 2, one line): not a
    special file, not a file, not over or inside the weights or the run being read, and a
    place that can be written (`cratemae.guard.check_output`)."""
    from cratemae.checkpoints.resolve import resolve_checkpoint, run_dir_of
    from cratemae.guard import check_output

    source = resolve_checkpoint(checkpoint)
    run = run_dir_of(source)
    check_output(out, kind="dir", reads=[source, *([run] if run is not None else [])])
