"""`analyze()`: measure every layer over a stream of image batches and gather what to draw."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cratemae.analysis.heads import SPARSITY_OF, SUBSPACES_OF
from cratemae.analysis.measures import EPS2, NonFiniteTokens
from cratemae.analysis.record import record_layers
from cratemae.analysis.summary import LayerSummary, PatchPCA
from cratemae.data.transforms import unnormalize
from cratemae.errors import CrateMAEError

if TYPE_CHECKING:
    from cratemae.weights.load import LoadedModel

__all__ = ["Analysis", "Picture", "analyze", "attention_layers"]


@dataclass
class Picture:
    """One image to draw, with its attention maps and PCA colours on the patch grid."""

    name: str
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (K, gh, gw)
    pca_rgb: np.ndarray | None = None  # (gh, gw, 3) in [0, 1]
    features: torch.Tensor | None = None  # (L_patches, d), dropped once coloured


@dataclass
class Analysis:
    """Everything `analyze` found: layers.json's content and the pictures."""

    layers: list[dict[str, Any]]
    num_images: int
    pca_layer: int
    pca_variance_ratio: list[float]
    pictures: list[Picture]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.meta,
            "num_images": self.num_images,
            "eps2": EPS2,
            "pca_layer": self.pca_layer,
            "pca_variance_ratio": self.pca_variance_ratio,
            "layers": self.layers,
        }


def attention_layers(depth: int) -> list[int]:
    """The penultimate and the last layer (numbered from 0), or the only one."""
    return sorted({max(depth - 2, 0), depth - 1})


def _for_display(imgs: torch.Tensor, model: LoadedModel) -> np.ndarray:
    """Normalised (B, 3, S, S) -> (B, S, S, 3) float32 in [0, 1], on the CPU."""
    return unnormalize(imgs, model.mean, model.std).permute(0, 2, 3, 1).cpu().numpy()


def analyze(
    model: LoadedModel,
    batches: Iterable[torch.Tensor],
    *,
    names: Sequence[str],
    pca_layer: int,
    device: torch.device,
    on_batch: Callable[[int], None] = lambda n: None,
) -> Analysis:
    """Run the encoder on every batch (normalised images); draw the first `len(names)`.

    `pca_layer` counts from 0 (the first block; -1 the last). The numbers do not depend
    on how the images are batched.
    """
    depth = model.config.depth
    if not -depth <= pca_layer < depth:
        raise ValueError(f"pca_layer {pca_layer}: the encoder has layers 0..{depth - 1}")
    pca_layer %= depth
    grid = model.config.grid_size
    summary, pca, pictures = LayerSummary(), PatchPCA(), []
    att_layers = attention_layers(model.config.depth)
    for imgs in batches:
        imgs = imgs.to(device, non_blocking=True)
        try:
            record = record_layers(
                model.encoder, imgs, attention_layers=att_layers, feature_layer=pca_layer
            )
        except NonFiniteTokens:
            raise CrateMAEError("the encoder's tokens are not finite on these images (inf or "
                                "NaN: its weights overflow in float32); nothing written") from None
        summary.add(record)
        if record.features is None:
            raise RuntimeError(f"record_layers: no features recorded for layer {pca_layer}")
        pca.add(record.features)
        start = summary.num_images - imgs.shape[0]
        keep = max(0, min(imgs.shape[0], len(names) - start))  # images of this batch to draw
        shown = _for_display(imgs[:keep], model) if keep else []
        for j in range(keep):
            attention = {
                layer: a[j].reshape(-1, grid, grid).cpu().numpy()  # (K, gh, gw)
                for layer, a in record.cls_attention.items()
            }
            pictures.append(
                Picture(names[start + j], shown[j], attention, features=record.features[j].cpu())
            )
        on_batch(imgs.shape[0])
    _colour(pictures, pca, grid)
    return Analysis(
        layers=summary.layers(),
        num_images=summary.num_images,
        pca_layer=pca_layer,
        pca_variance_ratio=pca.variance_ratio(),
        pictures=pictures,
        meta={
            "family": model.config.family,
            "subspaces": SUBSPACES_OF[model.config.family],
            "sparsity_of": SPARSITY_OF[model.config.family],
            "tokens_per_image": grid * grid + 1,
            "heads": model.config.num_heads,
            "embed_dim": model.config.embed_dim,
            "depth": model.config.depth,
        },
    )


def _colour(pictures: list[Picture], pca: PatchPCA, grid: int) -> None:
    """The first three principal components as RGB, each scaled to [0, 1] over the patches
    of all pictures together, so that a colour means the same in every picture."""
    if not pictures or pca.count < 2:
        return
    mean, comps = (t.cpu() for t in pca.fit(3))  # fitted where the model ran
    projected = [(p.features.to(torch.float64) - mean) @ comps for p in pictures]  # (L, 3)
    allp = torch.cat(projected)
    low, high = allp.quantile(0.01, dim=0), allp.quantile(0.99, dim=0)  # robust to outliers
    for p, x in zip(pictures, projected, strict=True):
        rgb = ((x - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
        p.pca_rgb = rgb.reshape(grid, grid, 3).float().numpy()
        p.features = None
