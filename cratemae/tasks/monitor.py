"""Pre-training's validation: what `MAETask.monitor` measures every `run.eval_every_steps`.

On a fixed subset of data.val -- `run.eval_images` images drawn without replacement by
`run.seed` from all of it (`subset_positions`), so a class-sorted folder gives every class
its share; the same at every evaluation, on resume and on every rank; read alone, without
decoding the rest (`subset_plan`), with the evaluation transform (resize + centre crop):

- `val_loss`: the masked-reconstruction loss with masks drawn once from `run.seed` per
  image, so that one evaluation compares with the next;
- `val_knn_top1` (percent), when the images carry labels: a weighted k-NN vote (cosine,
  k = 20, temperature 0.07, as DINO and InstDisc) of the encoder's CLS feature, fitted on
  `run.eval_images` images of data.train drawn the same way (another seeded draw);
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
import torch.nn.functional as F

from cratemae.analysis import record_layers
from cratemae.analysis.summary import LayerSummary
from cratemae.data.dataset import EpochDataset, ReadConfig
from cratemae.data.loader import Loader
from cratemae.data.plan import subset_plan
from cratemae.data.sources import Source, fill_counts, resolve_source
from cratemae.data.transforms import eval_transform
from cratemae.distributed.precision import resolve_precision
from cratemae.errors import BadInputError
from cratemae.model import CrateMAE
from cratemae.recipe import Recipe
from cratemae.viz.panel import render_reconstructions
from cratemae.viz.reconstruction import Reconstruction, mask_noise, reconstruct

__all__ = ["KNN_K", "KNN_TEMPERATURE", "SAMPLE_IMAGES", "PretrainMonitor", "knn_top1",
           "subset_positions"]

KNN_K, KNN_TEMPERATURE = 20, 0.07
SAMPLE_IMAGES = 8
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


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
             test_labels: torch.Tensor, *, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 (percent) of the weighted k-NN vote: each of the k most cosine-similar training
    features votes for its class with weight exp(similarity / temperature).

    train (N, d), train_labels (N,), test (M, d), test_labels (M,)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    similarity = test @ train.T  # (M, N)
    top, index = similarity.topk(min(k, train.shape[0]), dim=1)  # (M, k)
    classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    votes = torch.zeros(test.shape[0], classes, dtype=torch.float32, device=test.device)
    votes.scatter_add_(1, train_labels.to(test.device)[index], (top / temperature).exp())
    correct = votes.argmax(dim=1) == test_labels.to(test.device)
    return 100.0 * float(correct.double().mean())


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
        data = self.recipe.data
        source, positions = self.subsets[split]
        plan = subset_plan(source, positions, data.batch_size, max(1, data.num_workers))
        gpu = data.decode == "gpu"
        cfg = ReadConfig(transform=eval_transform(self.img_size, data.mean, data.std),
                         labelled=self.knn, gpu=gpu, seed=self.recipe.run.seed, epoch=0,
                         rank=0, shuffle_buffer=0)
        loader = Loader(EpochDataset(source.shards, plan, cfg), plan, source, data, 0)
        if gpu:
            loader.decode_on = (self.device, self.img_size)
        return loader

    def _images(self, split: str) -> Iterator[tuple[torch.Tensor, Any]]:
        """(images on the device, labels or None) of the subset of `split`."""
        for batch in self._loader(split):
            yield batch.images.to(self.device, non_blocking=True), batch.labels

    @torch.no_grad()
    def __call__(self, model: CrateMAE, step: int, run_dir: Path) -> dict[str, Any]:
        cfg = model.config
        noise = torch.rand(self.count, cfg.num_patches,  # (count, L): one mask per image
                           generator=torch.Generator().manual_seed(
                               self.recipe.run.seed * 1_000_003 + _MASK_SEED))
        shown = torch.randperm(self.count, generator=torch.Generator().manual_seed(
            self.recipe.run.seed))[:SAMPLE_IMAGES].sort().values
        layers, feats, labels, picked = LayerSummary(), [], [], []
        loss_sum, done = 0.0, 0
        for imgs, y in self._images("val"):
            n = imgs.shape[0]
            with self.precision.autocast():
                out = model(imgs, mask_ratio=self.recipe.model.mask_ratio,
                            noise=noise[done:done + n].to(self.device))
                feats.append(model.forward_features(imgs)[:, 0].float())  # CLS (B, d)
            loss_sum += float(out.loss) * n  # every image hides as many patches
            layers.add(record_layers(model.encoder, imgs))  # fp32, as `analyze`
            labels.append(y)
            mine = shown[(shown >= done) & (shown < done + n)] - done
            picked.extend((int(i) + done, imgs[int(i)]) for i in mine)
            done += n
        per_depth = layers.layers()
        result: dict[str, Any] = {
            "val_loss": loss_sum / max(done, 1),
            "coding_rate": [d["coding_rate"]["mean"] for d in per_depth],
            "sparsity": [d["sparsity"]["mean"] for d in per_depth],
            "eval_images": done,
        }
        if self.knn:
            result["val_knn_top1"] = self._knn(model, torch.cat(feats), torch.cat(labels))
        if picked:
            result["samples"] = self._picture(model, picked, step, run_dir)
        return result

    def _knn(self, model: CrateMAE, val: torch.Tensor, val_labels: torch.Tensor) -> float:
        """k-NN top-1 on the val features, fitted on data.train's."""
        feats, labels = [], []
        for imgs, y in self._images("train"):
            with self.precision.autocast():
                feats.append(model.forward_features(imgs)[:, 0].float())
            labels.append(y)
        return knn_top1(torch.cat(feats), torch.cat(labels), val, val_labels)

    def _picture(self, model: CrateMAE, picked: list[tuple[int, torch.Tensor]], step: int,
                 run_dir: Path) -> str:
        """Draw the picked images' reconstructions; the picture's path in `run_dir`."""
        data, cfg = self.recipe.data, model.config
        imgs = torch.stack([img for _, img in picked]).float()  # (n, 3, S, S) normalised
        mean = torch.tensor(data.mean, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(data.std, device=imgs.device).view(1, 3, 1, 1)
        pixels = (imgs * std + mean).clamp(0, 1)
        noise = mask_noise(cfg.num_patches, self.recipe.run.seed, len(picked)).to(imgs.device)
        recs = reconstruct(model, pixels, mean=data.mean, std=data.std,
                           mask_ratio=self.recipe.model.mask_ratio, noise=noise)
        positions = self.subsets["val"][1]  # name each image by its place in data.val
        rows = [(f"val #{positions[i]}", _on_cpu(rec))
                for (i, _), rec in zip(picked, recs, strict=True)]
        name = f"samples/step-{step:09d}.png"
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        render_reconstructions(rows, run_dir / name, mask_ratio=self.recipe.model.mask_ratio,
                               norm_pix=cfg.norm_pix_loss)
        return name


def _on_cpu(rec: Reconstruction) -> Reconstruction:
    return dataclasses.replace(rec, original=rec.original.cpu(), masked=rec.masked.cpu(),
                               prediction=rec.prediction.cpu(), pasted=rec.pasted.cpu(),
                               mask=rec.mask.cpu())
