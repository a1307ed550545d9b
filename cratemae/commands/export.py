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
    pt2 = "pt2"


_GRAPH_FILES = {ExportFormat.onnx: "model.onnx", ExportFormat.pt2: "model.pt2"}
_CHECKED_WITH = {ExportFormat.onnx: "onnxruntime", ExportFormat.pt2: "torch.export.load"}


def export(
    checkpoint: CheckpointArg,
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Directory to write.", show_default=False),
    ],
    format_: Annotated[
        str,
        typer.Option("--format", metavar="[safetensors|onnx|pt2]", help="File format to write."),
    ] = ExportFormat.safetensors.value,
    encoder_only: Annotated[
        bool, typer.Option("--encoder-only", help="Leave out the decoder (for downstream use).")
    ] = False,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", metavar="PX", show_default=False,
                     help="onnx and pt2: fix the height and width at PX (a multiple of the "
                     "patch size) instead of leaving them dynamic."),
    ] = None,
) -> None:
    """Export weights for other tools.

    CKPT is a checkpoint directory, a run directory (its latest checkpoint) or a weights
    file. safetensors: DIR/model.safetensors, DIR/config.json and a model card DIR/README.md,
    in timm's Hub layout: every cratemae command reads DIR, and timm loads it with
    timm.create_model("local-dir:DIR", pretrained=True) after
    import cratemae.weights.timm_models (or "hf-hub:USER/REPO" once uploaded).
    MAE ViT: the encoder only, as timm's own vit_* architecture (no cratemae import).
    onnx: DIR/model.onnx; pt2: DIR/model.pt2, a torch.export program (torch.export.load,
    no cratemae needed). Both hold the encoder's forward_features, images (batch, C, H, W)
    to features (batch, 1 + L, d), with batch, H and W dynamic (H and W multiples of the
    patch size) unless --image-size fixes them, and both are compared with PyTorch at the
    training size and two others before they are written.

    Examples:
      $ cratemae export runs/base --out exported/base
      $ cratemae export runs/base/checkpoints/step-000100000 --out exported/base --encoder-only
      $ cratemae export runs/base --out exported/base-onnx --format onnx
      $ cratemae export runs/base --out exported/base-pt2 --format pt2
      $ cratemae export runs/base --out exported/base-224 --format onnx --image-size 224
    """
    fmt = _format(format_)
    if image_size is not None:
        if fmt is ExportFormat.safetensors:
            raise BadInputError("--image-size applies to --format onnx and pt2 (a safetensors "
                                "export has no input size to fix)")
        if image_size <= 0:
            raise BadInputError(f"--image-size {image_size}: must be a positive number of "
                                "pixels")
    if not checkpoint.exists():
        raise BadInputError(f"{checkpoint}: checkpoint not found")
    _check_out(checkpoint, out)
    from cratemae.weights.load import load_model

    loaded = load_model(checkpoint)  # checks the weights against their configuration
    if fmt is not ExportFormat.safetensors:
        _export_graph(loaded, out, fmt, image_size)
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


def _format(value: str) -> ExportFormat:
    try:
        return ExportFormat(value)
    except ValueError:
        names = ", ".join(f.value for f in ExportFormat)
        raise BadInputError(f"--format {value}: expected one of {names}") from None


def _export_graph(loaded: LoadedModel, out: Path, fmt: ExportFormat,
                  image_size: int | None) -> None:
    """model.onnx or model.pt2, checked before it replaces anything, then config.json
    describing it."""
    from cratemae.checkpoints.files import file_digest
    from cratemae.weights.export import write_config_json
    from cratemae.weights.graph import EXPORT_TOLERANCE, check_image_size

    patch = loaded.config.patch_size
    if image_size is not None:
        check_image_size(image_size, patch)
    file = out / _GRAPH_FILES[fmt]
    if fmt is ExportFormat.onnx:
        from cratemae.weights.onnx import export_onnx

        result = export_onnx(loaded.encoder, file, image_size=image_size)
    else:
        from cratemae.weights.pt2 import export_pt2

        result = export_pt2(loaded.encoder, file, image_size=image_size)
    digest = file_digest(result.file)["sha256"]
    io = {"input": "images (batch, C, H, W)", "output": "features (batch, 1 + L, d)",
          "dynamic": ["batch"] if image_size else ["batch", "height", "width"],
          "image_size": image_size, "multiple_of": patch}
    config_file = write_config_json(out, loaded, file=result.file, sha256=digest,
                                    extra={"encoder_only": True, fmt.value: io})
    sizes = (f"height and width fixed at {image_size} px" if image_size
             else f"dynamic batch, height and width: multiples of {patch} px")
    typer.echo(f"wrote {result.file} (encoder forward_features; {sizes}) and {config_file}")
    typer.echo(f"sha256 {digest}  {result.file.name}")
    if result.unchecked is not None:
        console.warn(f"not checked: {result.unchecked}")
        return
    at = ", ".join(f"{h}x{w}" for h, w in result.sizes)
    typer.echo(f"checked with {_CHECKED_WITH[fmt]} at {at} px: max abs difference "
               f"{result.max_abs:.2e} (tolerance {EXPORT_TOLERANCE:.0e} x (1 + |x|))")


def _check_out(checkpoint: Path, out: Path) -> None:
    """Where the export goes, checked before anything is read (exit 2, one line): not a
    special file, not a file, not over or inside the weights or the run being read, a
    place that can be written (`cratemae.guard.check_output`), and not a folder whose
    files of these names another program wrote."""
    from cratemae.checkpoints.resolve import resolve_checkpoint, run_dir_of
    from cratemae.guard import check_output
    from cratemae.rundir import MODEL_FILE

    source = resolve_checkpoint(checkpoint)
    run = run_dir_of(source)
    check_output(out, kind="dir", reads=[source, *([run] if run is not None else [])])
    # A folder another program wrote (a model card, a config of its own) is not replaced;
    # an export's own folder (config.json "format": "cratemae") is written again.
    names = (MODEL_FILE, "config.json", "README.md", *_GRAPH_FILES.values())
    taken = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    if taken and not _exported_by_cratemae(out / "config.json"):
        raise BadInputError(f"--out {out}: holds {', '.join(taken)}, which cratemae export "
                            "did not write and would replace; give a new or empty directory")


def _exported_by_cratemae(config: Path) -> bool:
    import json

    from cratemae.guard import regular_file

    try:
        record = json.loads(regular_file(config).read_text(encoding="utf-8"))
    except (OSError, ValueError, BadInputError):
        return False
    return isinstance(record, dict) and record.get("format") == "cratemae"
