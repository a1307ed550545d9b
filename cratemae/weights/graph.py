"""What the ONNX and torch.export files share: the module they hold (the encoder's
`forward_features`), the image sizes they take and are checked at, and how a file's output
is compared with PyTorch's.

The graphs take images (batch, C, H, W) with batch, H and W dynamic, H and W multiples of
the patch size (the position table is computed in the graph for the grid it is given), or
one fixed size (`--image-size`) for runtimes that need static shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cratemae.errors import BadInputError, CrateMAEError
from cratemae.model import CrateEncoder

__all__ = ["EXPORT_TOLERANCE", "Features", "GraphExport", "check_cases", "check_image_size",
           "compare", "other_sizes", "over_tolerance", "test_images"]

# Accepted difference between an exported graph and PyTorch (float32, CPU, random input), per
# element: |graph - torch| <= EXPORT_TOLERANCE * (1 + |torch|). Features after the final norm
# reach |x| ~ 7, and 12 layers of float32 matmuls summed in another order differ there by
# 3e-5 to 1.2e-4 depending on the weights and the input (measured on the Base preset, ONNX);
# a wrong graph (a missing layer, a sign, the table of another grid) differs by order 1e-2
# or more.
EXPORT_TOLERANCE = 5e-4
# The smaller and larger sizes checked besides the training size, as fractions of its grid:
# 160 and 288 px for 224 px at patch 16 (grids 10 and 18 for 14).
SMALLER, LARGER = 5 / 7, 9 / 7
MIN_GRID = 2  # torch.export treats a side of one patch as a special case: two at least


class Features(nn.Module):
    """The module a graph file holds: `encoder.forward_features`, (B, C, H, W) -> (B, 1+L, d)."""

    def __init__(self, encoder: CrateEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)


@dataclass(frozen=True)
class GraphExport:
    """The file written, the sizes (H, W) it was compared with PyTorch at, and the result
    (`max_abs`, `max_scaled`: see `compare`), or why it was not compared (`unchecked`)."""

    file: Path
    sizes: tuple[tuple[int, int], ...] = ()
    max_abs: float | None = None
    max_scaled: float | None = None
    unchecked: str | None = None


def check_image_size(image_size: int, patch_size: int) -> int:
    """A size given for a fixed-size graph: positive, and a multiple of the patch size
    (BadInputError, one line, otherwise)."""
    if image_size <= 0:
        raise BadInputError(f"--image-size {image_size}: must be a positive number of pixels")
    if image_size % patch_size:
        near = max(1, round(image_size / patch_size)) * patch_size
        raise BadInputError(f"--image-size {image_size}: not a multiple of the patch size "
                            f"{patch_size} (e.g. {near})")
    return image_size


def other_sizes(img_size: int, patch_size: int) -> tuple[int, int]:
    """One smaller and one larger size than `img_size`, in whole patches: 160 and 288 for 224
    at patch 16."""
    grid = img_size // patch_size
    smaller = max(MIN_GRID, round(grid * SMALLER))
    larger = max(grid + 1, round(grid * LARGER))
    return smaller * patch_size, larger * patch_size


def check_cases(img_size: int, patch_size: int, fixed: int | None = None
                ) -> list[tuple[int, int, int]]:
    """(batch, H, W) a file is compared at. Dynamic: the training size, the two of
    `other_sizes`, and the smaller by the larger (H != W), with batches of 1 to 3. Fixed at
    `fixed` px: that size, batches of 1 and 3."""
    if fixed is not None:
        return [(1, fixed, fixed), (3, fixed, fixed)]
    small, large = other_sizes(img_size, patch_size)
    return [(2, img_size, img_size), (1, small, small), (1, large, large), (3, small, large)]


def test_images(batch: int, in_chans: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Seeded normal images (batch, C, H, W), float32: standardised inputs' scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, h, w, generator=g)


test_images.__test__ = False  # type: ignore[attr-defined]  (not a pytest test)


def compare(run: Callable[[torch.Tensor], torch.Tensor], encoder: CrateEncoder,
            cases: Sequence[tuple[int, int, int]], *, name: object) -> tuple[float, float]:
    """Run `run` (a graph's forward) and PyTorch's `forward_features` on the same seeded
    images for each (batch, H, W). Returns the largest absolute difference and the largest
    |graph - torch| / (1 + |torch|), the quantity `EXPORT_TOLERANCE` bounds; CrateMAEError
    naming `name` if an output's shape differs or either output is not finite."""
    encoder = encoder.eval()
    worst_abs = worst_scaled = 0.0
    for i, (batch, h, w) in enumerate(cases):
        x = test_images(batch, encoder.in_chans, h, w, seed=1 + i)
        with torch.no_grad():
            expected = encoder.forward_features(x)
            if not bool(torch.isfinite(expected).all()):  # NaN - NaN would compare as 0
                raise CrateMAEError(f"{name}: the model's own features are not finite at "
                                    f"{h}x{w} px (its weights overflow in float32); not written")
            try:
                got = run(x)
            except Exception as err:  # the runtime's own error types: one line, and why
                why = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
                raise CrateMAEError(f"{name}: failed at {h}x{w} px ({why}); not written"
                                    ) from err
        if tuple(got.shape) != tuple(expected.shape):
            raise CrateMAEError(f"{name}: output shape {tuple(got.shape)} at {h}x{w} px, "
                                f"expected {tuple(expected.shape)}")
        if not bool(torch.isfinite(got).all()):
            raise CrateMAEError(f"{name}: its output is not finite at {h}x{w} px, where "
                                "PyTorch's is; not written")
        diff = (got - expected).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_scaled = max(worst_scaled, float((diff / (1 + expected.abs())).max()))
    return worst_abs, worst_scaled


def over_tolerance(name: object, max_abs: float, max_scaled: float, what: str) -> None:
    """CrateMAEError (nothing written) if `max_scaled` is over `EXPORT_TOLERANCE`."""
    if max_scaled > EXPORT_TOLERANCE:
        raise CrateMAEError(f"{name}: {what} differs from PyTorch by {max_abs:.2e} "
                            f"(> {EXPORT_TOLERANCE:.0e} x (1 + |x|)); not written")
