"""The encoder's `forward_features` as ONNX, with dynamic batch, height and width, and a
check of the file against PyTorch with onnxruntime at several sizes.

Input `images` (batch, C, H, W) float32, normalised as for training; output `features`
(batch, 1 + L, d): the CLS token then the patch tokens, after the final norm. H and W are
any multiples of the patch size: the graph computes the position table from them, and
refuses another size (onnxruntime: "The input tensor cannot be reshaped to the requested
shape"). With `image_size`, H and W are fixed at that size instead (static shapes).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from cratemae.errors import CrateMAEError
from cratemae.fs import atomic_path
from cratemae.model import CrateEncoder
from cratemae.weights.graph import (
    Features,
    GraphExport,
    check_cases,
    compare,
    over_tolerance,
    test_images,
)

__all__ = ["OPSET", "OnnxUnavailableError", "check_onnx", "export_onnx"]

OPSET = 17  # LayerNormalization is native from 17; attention exports as MatMul + Softmax


class OnnxUnavailableError(CrateMAEError):
    """A package the ONNX path needs is not installed."""


def export_onnx(encoder: CrateEncoder, file: str | os.PathLike[str], *,
                image_size: int | None = None) -> GraphExport:
    """Write `file`, checked against PyTorch before it replaces anything: the graph is
    exported to a temporary name and compared there (`check_cases`: the training size and
    two others, or `image_size`), so a failed export or a comparison over
    `EXPORT_TOLERANCE` (CrateMAEError) leaves nothing behind, and a file already at `file`
    as it was. Without onnxruntime the file is written unchecked."""
    final = Path(file)
    _require_onnx()  # before anything, even the output folder, is made
    with atomic_path(final) as tmp:
        _write_graph(encoder, tmp, image_size)
        result = _compare(encoder, tmp, final, image_size)
    return result


def _require_onnx() -> None:
    """OnnxUnavailableError, one line naming the extra, unless the `onnx` package imports
    (torch's exporter builds the graph with it)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OnnxUnavailableError(
            "export --format onnx needs the onnx package, which is not installed: "
            "pip install 'cratemae[onnx]'") from None


def _compare(encoder: CrateEncoder, tmp: Path, final: Path, image_size: int | None
             ) -> GraphExport:
    """Check the file at `tmp` (to be installed as `final`); CrateMAEError if over tolerance."""
    config = encoder.config
    cases = check_cases(config.img_size, config.patch_size, image_size)
    sizes = tuple(dict.fromkeys((h, w) for _, h, w in cases))
    try:
        max_abs, max_scaled = check_onnx(encoder, tmp, cases, name=final)
    except OnnxUnavailableError as err:
        return GraphExport(final, unchecked=str(err))
    over_tolerance(final, max_abs, max_scaled, "onnxruntime")
    return GraphExport(final, sizes, max_abs, max_scaled)


def _write_graph(encoder: CrateEncoder, file: Path, image_size: int | None) -> None:
    """Export `forward_features` to `file`: batch, height and width dynamic, or the height
    and width fixed at `image_size`."""
    module = Features(encoder).eval()
    size = image_size or encoder.config.img_size
    example = test_images(2, encoder.in_chans, size, size)
    dynamic = {0: "batch"} if image_size else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter: the dynamo one needs onnxscript, an extra
        # dependency, for a graph this simple. Its deprecation notice, and its warnings that
        # sizes read in Python are traced as they were (only the checks of the input read
        # them: the graph computes every size it uses), are not the user's.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(file), dynamo=False,
            input_names=["images"], output_names=["features"],
            dynamic_axes={"images": dynamic, "features": {0: "batch", 1: "tokens"}},
            opset_version=OPSET, do_constant_folding=True,
        )


def check_onnx(
    encoder: CrateEncoder,
    file: str | os.PathLike[str],
    cases: list[tuple[int, int, int]] | None = None,
    *,
    name: str | os.PathLike[str] | None = None,
) -> tuple[float, float]:
    """Run `file` with onnxruntime and PyTorch on the same seeded images for each
    (batch, H, W) of `cases` (default: `check_cases` of the encoder's size). Returns the
    largest absolute difference and the largest |onnx - torch| / (1 + |torch|), the quantity
    `EXPORT_TOLERANCE` bounds. Raises OnnxUnavailableError without onnxruntime.
    `name`: the file's name in messages (its final name, while `file` is a temporary)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxUnavailableError(
            "onnxruntime is not installed, so the file was not compared with PyTorch: "
            "pip install 'cratemae[onnx]'"
        ) from None
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    if cases is None:
        cases = check_cases(encoder.config.img_size, encoder.config.patch_size)

    def run(x: torch.Tensor) -> torch.Tensor:
        (got,) = session.run(["features"], {"images": x.numpy()})
        return torch.from_numpy(got)

    return compare(run, encoder, cases, name=name or file)
