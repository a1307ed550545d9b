"""What `cratemae shard` reads from a source folder: its files and labels, split by split,
whatever its layout (a class folder, a folder of split folders, image-net.org's with its
devkit, Kaggle's, or a download format: CIFAR's, Flowers-102's, Oxford-IIIT Pets',
Hugging Face's Parquet files). The readers (`cratemae.data.sources`) share the split-folder
rule (`folders.split_folders`) and the download formats, so a folder is the same data to both.

Each download format is one module that says how to recognise it and how to read each split
(`cifar`, `flowers`, `pets`, `parquet`); `download_records` tries them in turn, or the one
`--layout` names, and holds no format's details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cratemae.data import cifar, flowers, parquet, pets
from cratemae.data.folders import list_images, split_folders
from cratemae.data.imagenet import (
    Labelled,
    devkit_dataset,
    is_kaggle_root,
    kaggle_dataset,
    reference_classes,
    relabel,
)
from cratemae.data.records import Records
from cratemae.errors import BadInputError

__all__ = ["LAYOUTS", "DownloadOptions", "InPlace", "download_records", "labelled_source",
           "read_in_place"]

log = logging.getLogger("cratemae.data")

# The names --layout takes: "folders" (class folders, split folders, ImageNet's layouts) and
# each download format.
LAYOUTS = ("folders", *cifar.FORMATS, "flowers102", "pets", "parquet")


@dataclass(frozen=True)
class DownloadOptions:
    """What a download format may be told: --layout, --cifar100-labels, the Parquet columns,
    and the seed of the order of Parquet's row groups."""

    layout: str | None = None
    cifar100_labels: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    seed: int = 0


def download_records(src: Path, options: DownloadOptions) -> Records | None:
    """The splits of `src` when it is a download format (recognised from its files, or the
    one `options.layout` names), else None (it is read as folders)."""
    name = options.layout
    if name is not None and name not in LAYOUTS:
        raise BadInputError(f"--layout {name}: unknown; the layouts are {', '.join(LAYOUTS)}")
    if name == "folders":
        return None
    if name is None:
        _one_download(src)
    if (name is None or name in cifar.FORMATS) and cifar.find_cifar(src, name) is not None:
        return cifar.cifar_records(src, name, options.cifar100_labels)
    if options.cifar100_labels is not None:
        raise BadInputError(f"{src}: --cifar100-labels applies to CIFAR-100, which this is not")
    if name == "flowers102" or (name is None and flowers.is_flowers_root(src)):
        return flowers.flowers_records(src)
    if name == "pets" or (name is None and pets.is_pets_root(src)):
        return pets.pets_records(src)
    if name == "parquet" or (name is None and parquet.is_parquet_source(src)):
        return parquet.parquet_records(src, options.image_column, options.label_column,
                                       options.seed)
    return None


def _one_download(src: Path) -> None:
    """Bad input when `src` holds several download formats (a data folder with
    `flowers-102/` and `oxford-iiit-pet/`): which one is meant is not for the order of
    the checks to decide."""
    if not src.is_dir():
        return
    found = [title for title, recognise in (
        ("CIFAR", lambda p: cifar.find_cifar(p) is not None),
        ("Flowers-102", flowers.is_flowers_root), ("Oxford-IIIT Pets", pets.is_pets_root),
        ("Parquet", parquet.is_parquet_source)) if recognise(src)]
    if len(found) > 1:
        raise BadInputError(f"{src}: holds several downloads ({', '.join(found)}); give the "
                            "folder of one, or name its layout with --layout")


@dataclass(frozen=True)
class InPlace:
    """One split of a download format read in place: pieces to wrap in shards, either
    record slices (CIFAR's batch files, Parquet's row groups) or labelled image files."""

    layout: str
    split: str  # the split read: data.val reads val, else test
    slices: list[tuple[str, int, object]]  # (name, samples, RecordSlice)
    files: list[tuple[str, int]]  # (image file, label)
    classes: tuple[str, ...] | None
    class_names: tuple[str, ...] | None = None


def read_in_place(path: Path, split: str) -> InPlace | None:
    """`split` of `path` read where it lies when `path` is a download format (the same
    labels as its shards: the same code reads them), else None."""
    _one_download(path)
    found = cifar.find_cifar(path) if path.is_dir() else None
    if found is not None:
        want = _split_read(path, split, tuple(found[0].splits))
        fmt, pieces, names = cifar.cifar_pieces(path, want)
        return InPlace(fmt.title, want, pieces, [], names)
    if parquet.is_parquet_source(path):
        title, pieces, names = parquet.parquet_pieces(path, split)
        return InPlace(title, split, pieces, [], names)
    for recognise, read in ((flowers.is_flowers_root, flowers.flowers_records),
                            (pets.is_pets_root, pets.pets_records)):
        if path.is_dir() and recognise(path):
            records = read(path)
            want = _split_read(path, split, tuple(records.splits))
            files = [(item.origin, item.label) for item in records.splits[want]]
            return InPlace(records.layout, want, [], files, records.classes)
    return None


def _split_read(path: Path, split: str, have: tuple[str, ...]) -> str:
    """The split data.SPLIT reads: its own, or for data.val the test split when there is
    no val split (CIFAR, Pets)."""
    if split in have:
        return split
    if split == "val" and "test" in have:
        log.info("data.val = %s: it has no val split; reading its test split", path)
        return "test"
    raise BadInputError(f"data.{split} = {path}: has the splits {', '.join(have)}, not {split}")


def labelled_source(src: Path, devkit: Path | None, classes_from: Path | None,
                    split: str, options: DownloadOptions | None = None) -> Labelled | Records:
    """The labelled files (or records) of `src`, split by split, whatever its layout."""
    options = options or DownloadOptions()
    columns = options.image_column or options.label_column
    if columns and options.layout != "parquet" and (options.layout is not None
                                                    or not parquet.is_parquet_source(src)):
        raise BadInputError(f"{src}: --image-column and --label-column apply to Parquet "
                            "files, which it does not hold")
    if devkit is None:
        records = download_records(src, options)
        if records is not None:
            if classes_from is not None:
                raise BadInputError(f"{src}: {records.layout} names its classes; drop "
                                    "--classes-from")
            return records
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
