"""The encoder's `forward_features` as a torch.export program (`.pt2`), with dynamic batch,
height and width, checked against PyTorch as the file loads back.

The same contract as the ONNX file: input images (batch, C, H, W) float32, normalised as for
training; output (batch, 1 + L, d). H and W are multiples of the patch size from two patches
up (the program computes the position table from them); another size is refused when the
program is called (a failed guard: `images.size()[2] % 16 == 0`). With `image_size`, H and W
are fixed at that size instead. The file holds ATen operations only: load it with
`torch.export.load(path).module()`, with no cratemae installed, on the same version of
torch (torch.export's format is not promised across versions).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from cratemae.fs import atomic_write_bytes
from cratemae.model import CrateEncoder
from cratemae.weights.graph import (
    MIN_GRID,
    Features,
    GraphExport,
    check_cases,
    compare,
    over_tolerance,
    test_images,
)

__all__ = ["export_program", "export_pt2"]


def export_program(encoder: CrateEncoder, image_size: int | None = None
                   ) -> torch.export.ExportedProgram:
    """torch.export of `forward_features`: batch, H and W dynamic (H and W whole patches,
    two at least), or H and W fixed at `image_size`. Non-strict, as torch.export's default."""
    p = encoder.config.patch_size
    size = image_size or encoder.config.img_size
    batch = Dim("batch", min=1)
    if image_size:
        shapes = {"images": {0: batch}}
    else:
        shapes = {"images": {0: batch, 2: p * Dim("grid_h", min=MIN_GRID),
                             3: p * Dim("grid_w", min=MIN_GRID)}}
    example = test_images(2, encoder.in_chans, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.export's notes on its own internals
        return torch.export.export(Features(encoder).eval(), (example,),
                                   dynamic_shapes=shapes, strict=False)


def export_pt2(encoder: CrateEncoder, file: str | os.PathLike[str], *,
               image_size: int | None = None) -> GraphExport:
    """Write `file`, checked before it replaces anything: the program is saved to memory,
    loaded back from those bytes and compared with PyTorch (`check_cases`: the training
    size and two others, or `image_size`), and only then written, so a comparison over
    `EXPORT_TOLERANCE` (CrateMAEError) leaves nothing behind, and a file already at `file`
    as it was."""
    final = Path(file)
    config = encoder.config
    cases = check_cases(config.img_size, config.patch_size, image_size)
    buffer = io.BytesIO()
    torch.export.save(export_program(encoder, image_size), buffer)
    data = buffer.getvalue()
    module = torch.export.load(io.BytesIO(data)).module()
    max_abs, max_scaled = compare(module, encoder, cases, name=final)
    over_tolerance(final, max_abs, max_scaled, "the torch.export program")
    atomic_write_bytes(final, data)
    sizes = tuple(dict.fromkeys((h, w) for _, h, w in cases))
    return GraphExport(final, sizes, max_abs, max_scaled)
