"""Evaluation over every sample of a split, shared by the ranks: where each sample sits in
the data set, and top-1/top-5 accuracy of a classifier.

An evaluation epoch gives each rank a contiguous run of the data set (a rank one short
repeats its last sample), read by the loader's streams in round-robin batches. Knowing each
yielded sample's global position (from the plan: `EpochPlan.sample_positions`) lets results
be counted once each and put in data-set order, so they do not depend on the number of ranks
or workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cratemae.data import Loader, build_data
from cratemae.distributed import dist
from cratemae.distributed.precision import Precision
from cratemae.errors import BadInputError
from cratemae.recipe.schema import DataSection

__all__ = ["classify", "eval_batches", "sample_positions", "topk_correct"]

Progress = Callable[[int, int], None]  # (images done on this rank, images on this rank)


def sample_positions(loader: Loader) -> list[int]:
    """Global positions (data-set order) of the samples `loader` yields, in yield order."""
    return loader.plan.sample_positions(loader.source)


def eval_batches(data: DataSection, split: str, img_size: int,
                 progress: Progress | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """(batch, global positions (B,)) over this rank's share of `split`, evaluation
    transform, fixed order; batches without labels are bad input."""
    info = dist.get_dist_info()
    split_data = build_data(data, split=split, augment="none",  # type: ignore[arg-type]
                            img_size=img_size, seed=0, rank=info.rank,
                            world_size=info.world_size, decode_device=info.device)
    loader = split_data.loader(epoch=0)
    positions = torch.tensor(split_data.positions(epoch=0), dtype=torch.int64)
    done = 0
    for batch in loader:
        if batch.labels is None:
            raise BadInputError(f"data.{split}: the samples carry no class labels")
        n = len(batch)
        yield batch, positions[done:done + n]
        done += n
        if progress is not None:
            progress(done, len(positions))
    dist.raise_together(loader.bad_fraction_error(final=True),
                        f"data.{split}: another rank found bad data (see its error: too "
                        "many bad samples, or a shard's declared count is wrong)")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C), (B,) -> (B,) bool: the label is among the k highest logits."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (B, k)
    return (top == labels[:, None]).any(dim=-1)


@torch.no_grad()
def classify(model: nn.Module, data: DataSection, img_size: int, precision: Precision,
             progress: Progress | None = None) -> dict[str, float]:
    """Top-1/top-5 (percent) of `model` (images -> logits) on data.val, over all ranks,
    each sample counted once; top-5 is None with 5 classes or fewer (it would be 100%)."""
    info = dist.get_dist_info()
    was_training = model.training
    model.eval()
    seen: set[int] = set()
    counts = torch.zeros(3, dtype=torch.float64)  # samples, top-1 hits, top-5 hits
    num_classes = 0
    for batch, pos in eval_batches(data, "val", img_size, progress):
        with precision.autocast():
            logits = model(batch.model_input(info.device)).float()
        labels = batch.labels.to(info.device)
        num_classes = logits.shape[-1]
        fresh = torch.tensor([int(p) not in seen for p in pos], device=info.device)
        seen.update(int(p) for p in pos)
        counts += torch.stack([fresh.sum(), (topk_correct(logits, labels, 1) & fresh).sum(),
                               (topk_correct(logits, labels, 5) & fresh).sum()]).double().cpu()
    model.train(was_training)
    counts = dist.all_reduce_sum(counts.to(dist.comm_device())).cpu()
    n = max(float(counts[0]), 1.0)
    top5 = 100 * float(counts[2]) / n if num_classes > 5 else None
    return {"top1": 100 * float(counts[1]) / n, "top5": top5, "images": int(counts[0])}
