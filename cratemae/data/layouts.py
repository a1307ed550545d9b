"""What `cratemae shard` reads from a source folder: its files and labels, split by split,
whatever its layout (a class folder, a folder of split folders, image-net.org's with its
devkit, Kaggle's). The readers (`cratemae.data.sources`) share the split-folder rule
(`folders.split_folders`), so a folder is the same data to both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cratemae.data.folders import list_images, split_folders
from cratemae.data.imagenet import (
    Labelled,
    devkit_dataset,
    is_kaggle_root,
    kaggle_dataset,
    reference_classes,
    relabel,
)
from cratemae.errors import BadInputError

__all__ = ["labelled_source"]

log = logging.getLogger("cratemae.data")


def labelled_source(src: Path, devkit: Path | None, classes_from: Path | None,
                    split: str) -> Labelled:
    """The labelled files of `src`, split by split, whatever its layout."""
    if devkit is not None:
        return devkit_dataset(src, Path(devkit), classes_from, split)
    if is_kaggle_root(src):
        _no_classes_from(src, classes_from)
        return kaggle_dataset(src)
    folders = split_folders(src)
    if folders:
        return _split_folders(src, folders, classes_from)
    files, classes = _files(src)
    names = None
    if classes_from is not None:
        if classes is None:
            raise BadInputError(f"{src}: has no class folders to label by --classes-from")
        ref, names = reference_classes(Path(classes_from))
        files, classes = relabel(files, classes, ref, str(src)), ref
    return Labelled({split: files}, {split: src}, classes, names)


def _no_classes_from(src: Path, classes_from: Path | None) -> None:
    if classes_from is not None:
        raise BadInputError(f"{src}: holds its train split, which gives the classes; "
                            "drop --classes-from")


def _files(folder: Path) -> tuple[list[tuple[str, int]], tuple[str, ...] | None]:
    """Every visible file of `folder`, labelled by its class folders (the writer reports
    those that are not images); bad input when there is none."""
    files, classes = list_images(folder, any_file=True)
    if not files:
        raise BadInputError(f"{folder}: no files to shard")
    return files, classes


def _split_folders(src: Path, folders: dict[str, Path], classes_from: Path | None) -> Labelled:
    """A folder whose sub-folders are its splits: each written as its own split; the
    classes are train/'s (or --classes-from's), which the other splits' labels follow."""
    listed = {s: _files(d) for s, d in folders.items()}
    if "train" in listed:
        _no_classes_from(src, classes_from)
        classes, names = listed["train"][1], None
    elif classes_from is not None:
        classes, names = reference_classes(Path(classes_from))
    else:
        classes, names = next(iter(listed.values()))[1], None
    splits = {}
    for s, (files, own) in listed.items():
        if (own is None) != (classes is None):
            raise BadInputError(f"{folders[s]}: {'has' if own else 'has no'} class folders, "
                                f"unlike the {'train split' if 'train' in listed else 'others'}")
        splits[s] = files if own is None or own == classes else relabel(
            files, own, classes, str(folders[s]))
    log.info("%s: its sub-folders are splits (%s), each written as its own", src,
             ", ".join(d.name for d in folders.values()))
    return Labelled(splits, folders, classes, names)
