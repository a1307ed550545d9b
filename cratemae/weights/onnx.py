"""The encoder's `forward_features` as ONNX, with a dynamic batch dimension, and a check of
the file against PyTorch with onnxruntime.

Input `images` (batch, C, H, W) float32, normalised as for training; output `features`
(batch, 1 + L, d): the CLS token then the patch tokens, after the final norm. H and W are
fixed at the model's training size (the position table is baked in).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from cratemae.errors import CrateMAEError
from cratemae.model import CrateEncoder

__all__ = ["ONNX_TOLERANCE", "OnnxUnavailableError", "check_onnx", "export_onnx"]

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


def export_onnx(encoder: CrateEncoder, file: str | os.PathLike[str]) -> Path:
    """Write `file` (via a temporary name, so a failed export leaves nothing behind)."""
    final = Path(file)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    module = _Features(encoder).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter: the dynamo one needs onnxscript, an extra
            # dependency, for a graph this simple. Its deprecation notice is not the user's.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (_example(encoder, 2),), str(tmp), dynamo=False,
                input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True,
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def check_onnx(
    encoder: CrateEncoder, file: str | os.PathLike[str], batch_sizes: tuple[int, ...] = (1, 3)
) -> tuple[float, float]:
    """Run `file` with onnxruntime and PyTorch on the same random input for each batch size.
    Returns the largest absolute difference and the largest |onnx - torch| / (1 + |torch|),
    the quantity `ONNX_TOLERANCE` bounds. Raises OnnxUnavailableError without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxUnavailableError(
            "onnxruntime is not installed (pip install 'cratemae[onnx]')"
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
            raise CrateMAEError(f"{file}: output shape {got.shape}, expected {expected.shape}")
        diff = (torch.from_numpy(got) - expected).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_scaled = max(worst_scaled, float((diff / (1 + expected.abs())).max()))
    return worst_abs, worst_scaled
