"""Class labels: how many a data set has, whether it has any, whether data.train and
data.val name their classes alike, and a check that a batch's labels fit a head."""

from __future__ import annotations

import logging

import torch

from cratemae.data.shards import iter_shard
from cratemae.data.sources import Source, resolve_source
from cratemae.distributed import dist
from cratemae.errors import BadInputError
from cratemae.recipe import Recipe
from cratemae.recipe.schema import DataSection

__all__ = ["check_labels", "class_names", "resolve_num_classes"]

log = logging.getLogger("cratemae")


def resolve_num_classes(recipe: Recipe, wanted: int | None, key: str) -> int:
    """`wanted`, checked against the class names of data.train when the data has them.
    Unlabelled data is refused first, whatever `wanted` says; class names of data.val
    that differ from data.train's are refused (the same label would mean two classes)."""
    train = resolve_source(recipe.data.train, "train")
    classes = train.classes
    if classes is None:
        _require_labels(train, "train")
    if recipe.data.val is not None:
        _check_same_classes(classes, resolve_source(recipe.data.val, "val"))
    if wanted is None and classes is None:
        raise BadInputError(f"{key} is not set and data.train carries no class names: set it")
    if wanted is not None and classes is not None and wanted != len(classes):
        raise BadInputError(f"{key} = {wanted}, but data.train has {len(classes)} classes")
    return wanted if wanted is not None else len(classes)  # type: ignore[arg-type]


def class_names(data: Recipe | DataSection, split: str = "train") -> tuple[str, ...] | None:
    """The names of the labels of data.`split` (label i is name i) for people to read: the
    readable names its shards record ("tench, Tinca tinca", from ImageNet's metadata), else
    its class ids (synsets, class folder names); None when the data name no classes.
    Takes a recipe (its data section) or a data section."""
    section = data.data if isinstance(data, Recipe) else data
    source = resolve_source(section.train if split == "train" else section.val, split)
    return source.class_names or source.classes


def _require_labels(source: Source, split: str) -> None:
    """BadInputError when the first sample of `split` has no `.cls` label (unlabelled
    shards, a flat image folder): said before anything asks for a number of classes."""
    first = next(iter_shard(source.shards[0], 0, 1), None)
    if first is not None and first.missing is None and "cls" not in first.parts:
        raise BadInputError(
            f"data.{split}: {source.shards[0].url} holds no class labels (sample "
            f"{first.key!r} has no .cls); this command needs labelled data: class sub-folders, "
            "or shards with .cls members (cratemae shard writes them from class folders)")


def _check_same_classes(train: tuple[str, ...] | None, val: Source) -> None:
    """Refuse class names that differ between the splits; warn loudly when only one split
    names its classes, as then nothing shows that label i means the same class in both."""
    if train is not None and val.classes is not None and train != val.classes:
        diff = next((f"label {i} is {a!r} in data.train, {b!r} in data.val"
                     for i, (a, b) in enumerate(zip(train, val.classes, strict=False))
                     if a != b), f"{len(train)} classes in data.train, {len(val.classes)} "
                                 "in data.val")
        raise BadInputError(f"data.train and data.val name their classes differently: {diff}")
    if (train is None) != (val.classes is None) and dist.is_main_process():
        named, numbered = ("train", "val") if train is not None else ("val", "train")
        names = train or val.classes or ()
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        log.warning(
            "data.%s names its classes (%s, labels 0..%d in that order) but data.%s has "
            "numbered labels only: make sure its .cls numbers follow the same order, or the "
            "scores mean nothing", named, shown, len(names) - 1, numbered)


def check_labels(labels: torch.Tensor | None, num_classes: int, key: str,
                 split: str = "train") -> None:
    """Bad input if a batch (labels on the CPU) has no labels or one outside the head."""
    if labels is None:
        raise BadInputError(f"data.{split}: the samples carry no class labels")
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise BadInputError(f"data.{split}: label {int(labels.max())} seen, but {key} = "
                            f"{num_classes} (labels must be 0..{num_classes - 1})")
