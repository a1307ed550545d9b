"""Pre-training's validation: what `MAETask.monitor` measures every `run.eval_every_steps`.

On a fixed subset of data.val -- `run.eval_images` images drawn by `run.seed`
(`cratemae.eval.validation`: the draw, the reading, the loss):

- `val_loss`: the masked-reconstruction loss with masks drawn once from `run.seed` per
  image, so that one evaluation compares with the next;
- `val_knn_top1` (percent), when the images carry labels: a weighted k-NN vote
  (`cratemae.eval.knn`: cosine, k = 20, temperature 0.07) of the encoder's CLS feature,
  fitted on `run.eval_images` images of data.train drawn the same way (another seeded draw);
- `coding_rate` and `sparsity`: per depth (input, then each layer), the means over the
  images of what `cratemae analyze` measures (`cratemae.analysis`: one implementation);
- `samples`: 8 images picked by `run.seed` among the subset, masked alike at every
  evaluation, drawn as `cratemae reconstruct` draws them into `samples/step-NNNNNNNNN.png`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cratemae.analysis import record_layers
from cratemae.analysis.summary import LayerSummary
from cratemae.data.counts import fill_counts
from cratemae.data.loader import Loader
from cratemae.data.sources import Source, resolve_source
from cratemae.data.transforms import unnormalize
from cratemae.distributed.precision import resolve_precision
from cratemae.errors import BadInputError
from cratemae.eval.knn import cls_features, knn_top1
from cratemae.eval.validation import (
    on_device,
    subset_loader,
    subset_positions,
    validation_masks,
    validation_pass,
)
from cratemae.model import CrateMAE
from cratemae.recipe import Recipe
from cratemae.rundir import SAMPLES_DIR
from cratemae.viz.panel import render_reconstructions
from cratemae.viz.reconstruction import Reconstruction, mask_noise, reconstruct

__all__ = ["SAMPLE_IMAGES", "PretrainMonitor"]

SAMPLE_IMAGES = 8


class PretrainMonitor:
    """Measures a `CrateMAE` on the fixed validation subset (see the module docstring)."""

    def __init__(self, recipe: Recipe, device: torch.device, img_size: int) -> None:
        self.recipe, self.device, self.img_size = recipe, device, img_size
        self.precision = resolve_precision(recipe.run.precision, device)
        # The k-NN needs class labels on both sides (a data set with class names), and
        # draws from data.train by position, which needs its sample counts (counting
        # unindexed shards would read all of data.train). Bad data (none, unreadable)
        # must stop the run now, on every rank, not at the first evaluation.
        train = resolve_source(recipe.data.train, "train")
        val = fill_counts(resolve_source(recipe.data.val, "val"))
        self.knn = (train.counts_known and train.classes is not None
                    and val.classes is not None)
        # split -> (its source, the sorted positions of the subset): fixed for the run.
        self.subsets = {"val": (val, self._draw(val, "val"))}
        if self.knn:
            self.subsets["train"] = (train, self._draw(train, "train"))
        self.count = len(self.subsets["val"][1])

    def _draw(self, source: Source, split: str) -> np.ndarray:
        total = sum(s.count or 0 for s in source.shards)
        if total == 0:
            raise BadInputError(f"data.{split}: no samples")
        return subset_positions(total, self.recipe.run.eval_images, self.recipe.run.seed, split)

    def _loader(self, split: str) -> Loader:
        """The subset of `split`, in batches of data.batch_size, evaluation transform."""
        source, positions = self.subsets[split]
        return subset_loader(source, positions, self.recipe.data, img_size=self.img_size,
                             labelled=self.knn, seed=self.recipe.run.seed, device=self.device)

    def _images(self, split: str) -> Iterator[tuple[torch.Tensor, Any]]:
        """(images on the device, labels or None) of the subset of `split`."""
        return on_device(self._loader(split), self.device)

    @torch.no_grad()
    def __call__(self, model: CrateMAE, step: int, run_dir: Path) -> dict[str, Any]:
        cfg, seed = model.config, self.recipe.run.seed
        noise = validation_masks(self.count, cfg.num_patches, seed)  # (count, L)
        shown = torch.randperm(self.count, generator=torch.Generator().manual_seed(
            seed))[:SAMPLE_IMAGES].sort().values
        layers, picked = LayerSummary(), []

        def each(imgs: torch.Tensor, start: int) -> None:
            """Per-layer measures of the batch, and the images of it to draw."""
            layers.add(record_layers(model.encoder, imgs))  # fp32, as `analyze`
            mine = shown[(shown >= start) & (shown < start + imgs.shape[0])] - start
            picked.extend((int(i) + start, imgs[int(i)]) for i in mine)

        val = validation_pass(model, self._images("val"), noise=noise, each=each,
                              mask_ratio=self.recipe.model.mask_ratio, precision=self.precision)
        per_depth = layers.layers()
        result: dict[str, Any] = {
            "val_loss": val.loss,
            "coding_rate": [d["coding_rate"]["mean"] for d in per_depth],
            "sparsity": [d["sparsity"]["mean"] for d in per_depth],
            "eval_images": val.count,
        }
        if self.knn:
            train, train_labels = cls_features(model, self._images("train"), self.precision)
            result["val_knn_top1"] = knn_top1(train, train_labels, val.features,
                                              torch.cat(val.labels))
        if picked:
            result["samples"] = self._picture(model, picked, step, run_dir)
        return result

    def _picture(self, model: CrateMAE, picked: list[tuple[int, torch.Tensor]], step: int,
                 run_dir: Path) -> str:
        """Draw the picked images' reconstructions; the picture's path in `run_dir`."""
        data, cfg = self.recipe.data, model.config
        imgs = torch.stack([img for _, img in picked])  # (n, 3, S, S) normalised
        pixels = unnormalize(imgs, data.mean, data.std)  # in [0, 1]
        noise = mask_noise(cfg.num_patches, self.recipe.run.seed, len(picked)).to(imgs.device)
        recs = reconstruct(model, pixels, mean=data.mean, std=data.std,
                           mask_ratio=self.recipe.model.mask_ratio, noise=noise)
        positions = self.subsets["val"][1]  # name each image by its place in data.val
        rows = [(f"val #{positions[i]}", _on_cpu(rec))
                for (i, _), rec in zip(picked, recs, strict=True)]
        name = f"{SAMPLES_DIR}/step-{step:09d}.png"
        (run_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        render_reconstructions(rows, run_dir / name, mask_ratio=self.recipe.model.mask_ratio,
                               norm_pix=cfg.norm_pix_loss)
        return name


def _on_cpu(rec: Reconstruction) -> Reconstruction:
    return dataclasses.replace(rec, original=rec.original.cpu(), masked=rec.masked.cpu(),
                               prediction=rec.prediction.cpu(), pasted=rec.pasted.cpu(),
                               mask=rec.mask.cpu())
