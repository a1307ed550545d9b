"""Pre-training's validation measures, on a fixed subset of a split.

The subset is `count` images drawn without replacement by the run's seed from all of the
split (`subset_positions`), so that a class-sorted folder gives every class its share; the
same at every evaluation, on resume and on every rank. It is read alone, without decoding
the rest (`subset_loader`), with the evaluation transform (resize + centre crop).

`validation_pass` measures the masked-reconstruction loss over it with masks drawn once per
image (`validation_masks`), so that one evaluation compares with the next, and keeps the
CLS features for the k-NN vote (`cratemae.eval.knn`). When and what to measure, and the
pictures, are the monitor's (`cratemae.tasks.monitor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cratemae.data.dataset import EpochDataset, ReadConfig
from cratemae.data.loader import Loader
from cratemae.data.plan import subset_plan
from cratemae.data.sources import Source
from cratemae.data.transforms import eval_transform
from cratemae.distributed.precision import Precision
from cratemae.model import CrateMAE
from cratemae.recipe.schema import DataSection

__all__ = [
    "ValidationResult",
    "on_device",
    "subset_loader",
    "subset_positions",
    "validation_masks",
    "validation_pass",
]

_MASK_SEED = 0x5EED  # the masks of val_loss, mixed with run.seed
_SUBSET_SEED = 0x5AB5E7  # the draw of the evaluated images, mixed with run.seed
_SPLIT_IDS = {"val": 0, "train": 1}


def subset_positions(total: int, count: int, seed: int, split: str) -> np.ndarray:
    """`min(count, total)` distinct positions in 0..total-1, drawn by (`seed`, `split`) alone
    and sorted: the same subset on every rank, at every evaluation and after a resume.

    Positions count samples in the order the split lists them (shard after shard)."""
    rng = np.random.default_rng([seed % 2**64, _SUBSET_SEED, _SPLIT_IDS[split]])
    # Generator.choice draws a small subset of a large range without a permutation of it.
    return np.sort(rng.choice(total, size=min(count, total), replace=False))


def subset_loader(source: Source, positions: np.ndarray, data: DataSection, *, img_size: int,
                  labelled: bool, seed: int, device: torch.device) -> Loader:
    """The subset at `positions` of `source`, in batches of data.batch_size, in position
    order, evaluation transform (decoded on `device` when data.decode is "gpu")."""
    plan = subset_plan(source, positions, data.batch_size, max(1, data.num_workers))
    gpu = data.decode == "gpu"
    cfg = ReadConfig(transform=eval_transform(img_size, data.mean, data.std),
                     labelled=labelled, gpu=gpu, seed=seed, epoch=0, rank=0, shuffle_buffer=0)
    loader = Loader(EpochDataset(source.shards, plan, cfg), plan, source, data, 0)
    if gpu:
        loader.decode_on = (device, img_size)
    return loader


def on_device(loader: Iterable[Any], device: torch.device) -> Iterator[tuple[torch.Tensor, Any]]:
    """(images on `device`, labels or None) of each batch of `loader`; at its end, a shard
    of the subset found to hold another number of samples than declared is an error (the
    subset is the same on every rank, so every rank that reads it raises it)."""
    for batch in loader:
        yield batch.model_input(device), batch.labels
    if isinstance(loader, Loader) and (error := loader.count_error()) is not None:
        raise error


def validation_masks(count: int, num_patches: int, seed: int) -> torch.Tensor:
    """(count, L) masking noise, one row per image of the subset, drawn from `seed` alone:
    every evaluation hides the same patches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + _MASK_SEED)
    return torch.rand(count, num_patches, generator=g)


@dataclass(frozen=True)
class ValidationResult:
    loss: float  # the mean masked-reconstruction loss per image
    features: torch.Tensor  # (N, d) float32 CLS features of the unmasked images
    labels: list[Any]  # per batch: its labels, or None
    count: int  # N


@torch.no_grad()
def validation_pass(
    model: CrateMAE,
    batches: Iterable[tuple[torch.Tensor, Any]],
    *,
    noise: torch.Tensor,
    mask_ratio: float,
    precision: Precision,
    each: Callable[[torch.Tensor, int], None] = lambda imgs, start: None,
) -> ValidationResult:
    """One pass over the subset: the loss under `noise` (row i masks image i) and the CLS
    features; `each(images, start)` sees every batch too (the monitor's other measures),
    `start` being the position in the subset of its first image."""
    feats, labels = [], []
    loss_sum, done = 0.0, 0
    for imgs, y in batches:
        n = imgs.shape[0]
        with precision.autocast():
            out = model(imgs, mask_ratio=mask_ratio, noise=noise[done:done + n].to(imgs.device))
            feats.append(model.forward_features(imgs)[:, 0].float())  # CLS (B, d)
        loss_sum += float(out.loss) * n  # every image hides as many patches
        labels.append(y)
        each(imgs, done)
        done += n
    features = torch.cat(feats) if feats else torch.empty(0)
    return ValidationResult(loss_sum / max(done, 1), features, labels, done)
