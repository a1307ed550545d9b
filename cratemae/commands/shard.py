"""`cratemae shard`: turn a folder of images into shuffled WebDataset shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands import console

__all__ = ["shard"]

_SKIPPED_SHOWN = 20


def shard(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="SRC",
            help="Image folder: class sub-folders (labelled) or images directly (unlabelled); "
            "a folder whose sub-folders are its splits (train/, val/, test/); ImageNet's train "
            "or val folder (with --devkit), or the root of Kaggle's ImageNet.",
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Where to write the shards.")],
    shard_size_mb: Annotated[float, typer.Option(help="Target shard size in MB.")] = 100,
    max_bad_fraction: Annotated[float | None, typer.Option(
        help="Refuse a split in which more than this fraction of the images are missing or "
             "unreadable (as data.max_bad_fraction does when reading). Default: 0.01 for "
             "downloads that list their images (CIFAR, Flowers, Pets, Parquet), no limit "
             "for folders.")] = None,
    max_per_shard: Annotated[
        int | None, typer.Option(help="At most this many samples per shard (more shards).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Put this fraction of the images in a val split.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle and of the val split.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the shards of a non-empty OUT_DIR.")
    ] = False,
    devkit: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="The unpacked ILSVRC2012 devkit: labels SRC, image-net.org's flat val folder "
            "(or a folder holding train/ and val/), by its ground truth and meta.mat, and "
            "gives the readable class names (of a train/ folder too).",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="The split SRC's images go in: train, or val for a val folder.")
    ] = "train",
    classes_from: Annotated[
        Path | None,
        typer.Option(
            metavar="TRAIN",
            help="Train shards (an OUT_DIR of this command) or train folder whose classes "
            "SRC's labels follow; a class of SRC that TRAIN lacks is an error.",
        ),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Read SRC as this layout instead of recognising it from its files: folders, "
            "cifar10-binary, cifar100-binary, cifar10-python, cifar100-python, flowers102, "
            "pets, parquet.",
        ),
    ] = None,
    cifar100_labels: Annotated[
        str | None,
        typer.Option(metavar="KIND", help="CIFAR-100's labels: fine (100 classes, the "
                     "default) or coarse (20 super-classes)."),
    ] = None,
    image_column: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Parquet: the image column (else found by its type)."),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Parquet: the label column (else found by its type)."),
    ] = None,
) -> None:
    """Turn a folder of images into shuffled WebDataset shards plus shards.json.

    Class sub-folders of SRC give the labels (written as KEY.cls; the class names go in
    shards.json). A SRC whose only sub-folders are train/ and val/ (or test/) is written
    as those splits (train-*.tar, val-*.tar), the classes being train/'s sub-folders, as
    data.train and data.val read such a folder. JPEG files keep their bytes (KEY.jpg),
    other images are stored losslessly as PNG (KEY.png). Files that are not readable images
    are listed at the end and left out; a split with no readable image is an error, which
    leaves OUT_DIR as it was. Point data.train (and data.val) of a recipe at OUT_DIR to read it.

    ImageNet as downloaded: image-net.org's flat val folder is labelled by --devkit (its
    train/ folder then gets the readable class names); the root of Kaggle's layout
    (ILSVRC/Data/CLS-LOC, LOC_val_solution.csv, LOC_synset_mapping.txt) gives train-*.tar
    and val-*.tar. Labels follow the sorted synset ids, as the train folder's do, and
    shards.json keeps the classes' readable names.

    Downloads, recognised from their files (--layout forces one), written as the splits
    they give (train-*.tar, val-*.tar, test-*.tar), numbered as the files (and torchvision)
    number them: CIFAR-10/100, binary or Python version (its pickles are read without
    running anything from them; CIFAR-100: fine labels unless --cifar100-labels coarse);
    Oxford Flowers-102 (jpg/, imagelabels.mat, setid.mat: train, val, test); Oxford-IIIT
    Pets (images/, annotations/: trainval written as train, and test); Hugging Face Parquet
    files (a folder of them, the split from each file's name; pip install
    'cratemae[parquet]').

    Examples:
      $ cratemae shard ~/photos/train data/shards
      $ cratemae shard imagenet/train data/in1k --val-fraction 0.01 --shard-size-mb 200
      $ cratemae shard small_set data/small --max-per-shard 64 --overwrite
      $ cratemae shard imagenet/train data/in1k --devkit devkit_t12
      $ cratemae shard imagenet/val data/in1k-val --devkit devkit_t12 --classes-from data/in1k
      $ cratemae shard imagenet-object-localization-challenge data/in1k
      $ cratemae shard photos/val data/photos-val --split val --classes-from data/photos
      $ cratemae shard photos data/photos          # photos/ holds train/ and val/
      $ cratemae shard cifar-10-batches-py data/cifar10
      $ cratemae shard cifar-100-binary data/cifar100-coarse --cifar100-labels coarse
      $ cratemae shard flowers-102 data/flowers102
      $ cratemae shard oxford-iiit-pet data/pets
      $ cratemae shard hf/cifar10 data/cifar10     # huggingface-cli download's folder
    """
    from cratemae.data.layouts import DownloadOptions
    from cratemae.data.writer import write_shards  # torch and PIL load lazily

    with console.progress(None, "sharding", every_percent=10, every_seconds=30) as bar:
        summary = write_shards(
            src,
            out_dir,
            shard_size_mb=shard_size_mb,
            max_per_shard=max_per_shard,
            val_fraction=val_fraction,
            seed=seed,
            overwrite=overwrite,
            progress=lambda done, total: bar.set(done, total),
            devkit=devkit,
            classes_from=classes_from,
            split=split,
            options=DownloadOptions(layout, cifar100_labels, image_column, label_column),
            max_bad_fraction=max_bad_fraction,
        )
    if summary.layout:
        console.log(f"layout: {summary.layout}")
    for split, shards in summary.splits.items():
        classes = summary.split_classes.get(split)
        console.log(f"{split}: {summary.samples(split)} samples in {len(shards)} shards"
                    + (f", {classes} classes" if classes else ""))
    if summary.classes:
        console.log(
            f"{len(summary.classes)} classes: {', '.join(summary.classes[:10])}"
            + (", ..." if len(summary.classes) > 10 else "")
        )
    console.log(f"wrote {summary.bytes_written / 1e6:.1f} MB to {summary.out_dir}")
    for path, reason in summary.skipped[:_SKIPPED_SHOWN]:
        console.warn(f"left out {path}: {reason}")
    if len(summary.skipped) > _SKIPPED_SHOWN:
        console.warn(f"... and {len(summary.skipped) - _SKIPPED_SHOWN} more files left out")
