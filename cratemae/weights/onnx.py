"""The encoder's `forward_features` as ONNX, with a dynamic batch dimension, and a check of
the file against PyTorch with onnxruntime.

Input `images` (batch, C, H, W) float32, normalised as for training; output `features`
(batch, 1 + L, d): the CLS token then the patch tokens, after the final norm. H and W are
fixed at the model's training size (the position table is baked in).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cratemae.errors import CrateMAEError
from cratemae.fs import atomic_path
from cratemae.model import CrateEncoder

__all__ = ["ONNX_TOLERANCE", "OnnxExport", "OnnxUnavailableError", "check_onnx", "export_onnx"]

# Accepted difference between onnxruntime and PyTorch (float32, CPU, random input), per
# element: |onnx - torch| <= ONNX_TOLERANCE * (1 + |torch|). Features after the final norm
# reach |x| ~ 7, and 12 layers of float32 matmuls summed in another order differ there by
# 3e-5 to 1.2e-4 depending on the weights and the input (measured on the Base preset); a
# wrong graph (a missing layer, a sign) differs by order 1.
ONNX_TOLERANCE = 5e-4
OPSET = 17  # LayerNormalization is native from 17; attention exports as MatMul + Softmax


class OnnxUnavailableError(CrateMAEError):
    """A package the ONNX path needs is not installed."""


class _Features(nn.Module):
    def __init__(self, encoder: CrateEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)


def _example(encoder: CrateEncoder, batch: int, seed: int = 0) -> torch.Tensor:
    c = encoder.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)


@dataclass(frozen=True)
class OnnxExport:
    """The file written and how it compared with PyTorch (`max_abs`, `max_scaled`: see
    `check_onnx`), or why it was not compared (`unchecked`, e.g. no onnxruntime)."""

    file: Path
    max_abs: float | None = None
    max_scaled: float | None = None
    unchecked: str | None = None


def export_onnx(encoder: CrateEncoder, file: str | os.PathLike[str]) -> OnnxExport:
    """Write `file`, checked against PyTorch before it replaces anything: the graph is
    exported to a temporary name and compared there, so a failed export or a comparison
    over `ONNX_TOLERANCE` (CrateMAEError) leaves nothing behind, and a file already at
    `file` as it was. Without onnxruntime the file is written unchecked."""
    final = Path(file)
    _require_onnx()  # before anything, even the output folder, is made
    with atomic_path(final) as tmp:
        _write_graph(encoder, tmp)
        result = _compare(encoder, tmp, final)
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


def _compare(encoder: CrateEncoder, tmp: Path, final: Path) -> OnnxExport:
    """Check the file at `tmp` (to be installed as `final`); CrateMAEError if over tolerance."""
    try:
        max_abs, max_scaled = check_onnx(encoder, tmp, name=final)
    except OnnxUnavailableError as err:
        return OnnxExport(final, unchecked=str(err))
    if max_scaled > ONNX_TOLERANCE:
        raise CrateMAEError(f"{final}: onnxruntime differs from PyTorch by {max_abs:.2e} "
                            f"(> {ONNX_TOLERANCE:.0e} x (1 + |x|)); not written")
    return OnnxExport(final, max_abs, max_scaled)


def _write_graph(encoder: CrateEncoder, file: Path) -> None:
    """Export `forward_features` with a dynamic batch dimension to `file`."""
    module = _Features(encoder).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter: the dynamo one needs onnxscript, an extra
        # dependency, for a graph this simple. Its deprecation notice is not the user's.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (_example(encoder, 2),), str(file), dynamo=False,
            input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True,
        )


def check_onnx(
    encoder: CrateEncoder,
    file: str | os.PathLike[str],
    batch_sizes: tuple[int, ...] = (1, 3),
    *,
    name: str | os.PathLike[str] | None = None,
) -> tuple[float, float]:
    """Run `file` with onnxruntime and PyTorch on the same random input for each batch size.
    Returns the largest absolute difference and the largest |onnx - torch| / (1 + |torch|),
    the quantity `ONNX_TOLERANCE` bounds. Raises OnnxUnavailableError without onnxruntime.
    `name`: the file's name in messages (its final name, while `file` is a temporary)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxUnavailableError(
            "onnxruntime is not installed, so the file was not compared with PyTorch: "
            "pip install 'cratemae[onnx]'"
        ) from None
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    worst_abs = worst_scaled = 0.0
    encoder = encoder.eval()
    for i, batch in enumerate(batch_sizes):
        x = _example(encoder, batch, seed=1 + i)
        with torch.no_grad():
            expected = encoder.forward_features(x)
        (got,) = session.run(["features"], {"images": x.numpy()})
        if tuple(got.shape) != tuple(expected.shape):
            raise CrateMAEError(
                f"{name or file}: output shape {got.shape}, expected {expected.shape}"
            )
        diff = (torch.from_numpy(got) - expected).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_scaled = max(worst_scaled, float((diff / (1 + expected.abs())).max()))
    return worst_abs, worst_scaled
