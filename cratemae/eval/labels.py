"""Class labels: how many a data set has, and a check that a batch's labels fit a head."""

from __future__ import annotations

import torch

from cratemae.data import build_loader
from cratemae.distributed import dist
from cratemae.errors import BadInputError
from cratemae.recipe import Recipe

__all__ = ["check_labels", "resolve_num_classes"]


def resolve_num_classes(recipe: Recipe, wanted: int | None, key: str) -> int:
    """`wanted`, checked against the class names of data.train when the data has them."""
    info = dist.get_dist_info()
    loader = build_loader(recipe.data, split="train", augment="none", img_size=8, seed=0, epoch=0,
                          rank=info.rank, world_size=info.world_size)
    classes = loader.classes
    if wanted is None and classes is None:
        raise BadInputError(f"{key} is not set and data.train carries no class names: set it")
    if wanted is not None and classes is not None and wanted != len(classes):
        raise BadInputError(f"{key} = {wanted}, but data.train has {len(classes)} classes")
    return wanted if wanted is not None else len(classes)  # type: ignore[arg-type]


def check_labels(labels: torch.Tensor | None, num_classes: int, key: str,
                 split: str = "train") -> None:
    """Bad input if a batch (labels on the CPU) has no labels or one outside the head."""
    if labels is None:
        raise BadInputError(f"data.{split}: the samples carry no class labels")
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise BadInputError(f"data.{split}: label {int(labels.max())} seen, but {key} = "
                            f"{num_classes} (labels must be 0..{num_classes - 1})")
