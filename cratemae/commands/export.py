"""`cratemae export`: write a checkpoint's weights for other tools (stub until it lands)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands.options import CheckpointArg, require_file
from cratemae.errors import NotBuiltError

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

    Examples:
      $ cratemae export runs/base/last.pt --out exported/base
      $ cratemae export runs/base/last.pt --out exported/base --encoder-only
      $ cratemae export runs/base/last.pt --out exported/base-onnx --format onnx
    """
    require_file(checkpoint, "checkpoint")
    raise NotBuiltError("cratemae export is not built yet")
