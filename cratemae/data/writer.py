"""`write_shards`: an image folder -> shuffled WebDataset shards plus `shards.json`.

Layout of OUT_DIR: `train-000000.tar`, ... (and `val-000000.tar`, ... with a val fraction),
and `shards.json` = {"format", "classes" (index = label), "splits": {split: [{"name",
"samples"}]}, "source", "skipped"}. Members are `KEY.jpg` (JPEG files keep their bytes),
`KEY.png` (any other image, re-encoded losslessly as PNG; PNG files keep their bytes) and
`KEY.cls` (label as text) for class-folder sources. KEY is the file's path under SRC (under
the split's folder for the ImageNet layouts), without its extension, with characters other
than letters, digits, `_`, `-` and `/` made `_`. ImageNet as downloaded (image-net.org's flat
val folder with its devkit, Kaggle's layout; see `cratemae.data.imagenet`) is labelled by
sorted synset, and `shards.json` then also holds the classes' readable names, "class_names".
The download formats (`layouts.download_records`: CIFAR, Flowers-102, Pets, Parquet) come as
`records.Records`, their items keyed as their module says, written as the splits they give
(`test-000000.tar` too).

Each shard is written under a hidden temporary name (`cratemae.fs`: `.NAME.tmp-PID-RANDOM`),
fsynced and renamed: a final-named tar is always complete. `shards.json` is written last, the
same way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cratemae.data.decode import BadSample
from cratemae.data.folders import INDEX_FORMAT, INDEX_NAME
from cratemae.data.layouts import DownloadOptions, labelled_source
from cratemae.data.records import Item, Records, image_member, load_image_file
from cratemae.errors import BadInputError
from cratemae.fs import AtomicFile, atomic_write_json, fsync_dir, is_temp_name, temp_path
from cratemae.guard import check_output

__all__ = ["Item", "ShardSummary", "image_member", "load_image_file", "write_dataset",
           "write_shards"]

log = logging.getLogger("cratemae.data")

Progress = Callable[[int, int], None]  # (items done, items in all)
_SPLITS = ("train", "val")  # the splits --split can name (`{split}-NNNNNN.tar`)
MAX_SHARD_MB = 1e6  # a terabyte: beyond it the option is a typo


@dataclass
class ShardSummary:
    """What `write_shards` wrote."""

    out_dir: Path
    splits: dict[str, list[tuple[str, int]]]  # split -> [(tar name, samples)]
    classes: tuple[str, ...] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    bytes_written: int = 0
    class_names: tuple[str, ...] | None = None  # readable names of `classes`, when known
    layout: str | None = None  # the download format recognised ("CIFAR-10, binary version")
    split_classes: dict[str, int] = field(default_factory=dict)  # split -> labels it holds

    def samples(self, split: str) -> int:
        return sum(n for _, n in self.splits.get(split, []))


LISTED_MAX_BAD = 0.01  # data.max_bad_fraction's default


def write_shards(
    src: Path,
    out_dir: Path,
    *,
    shard_size_mb: float = 100,
    max_per_shard: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    devkit: Path | None = None,
    classes_from: Path | None = None,
    split: str = "train",
    options: DownloadOptions | None = None,
    max_bad_fraction: float | None = None,
) -> ShardSummary:
    """Shard an ImageFolder tree (labelled), a flat folder of images (unlabelled), a folder
    whose sub-folders are its splits (`train/`, `val/`: `folders.split_folders`, as the
    readers decide), or ImageNet as downloaded: `devkit` labels image-net.org's flat val
    folder (or a folder with `train/` and `val/`) and names the synsets of its `train/`,
    and Kaggle's layout is recognised by its folders. `classes_from` (train shards or a
    train folder) gives the class list, which the labels then follow; `split` names the
    split a folder's images go in (a val folder: "val"). The download formats (CIFAR's,
    Flowers-102's, Pets', Parquet files: `layouts.download_records`) are recognised from
    their files, or named by `options.layout`, and written as the splits they give. A split
    in which more than `max_bad_fraction` of the listed images are missing or unreadable is
    bad input (as `data.max_bad_fraction` is when reading), and nothing is written; by
    default 0.01 for the downloads, whose files list their images, and no limit for folders
    (whose stray files are skipped and listed)."""
    src, out_dir = Path(src), Path(out_dir)
    options = DownloadOptions(seed=seed) if options is None else replace(options, seed=seed)
    if not (src.is_dir() or (src.is_file() and src.suffix == ".parquet")):
        raise BadInputError(f"{src}: not a directory")
    _check_numbers(shard_size_mb, max_per_shard, val_fraction, seed,
                   1.0 if max_bad_fraction is None else max_bad_fraction)
    if split not in _SPLITS or (split != "train" and val_fraction):
        raise BadInputError(f"--split {split}: must be {' or '.join(_SPLITS)}, and train with "
                            "--val-fraction")
    reads = [src, *(Path(p) for p in (devkit, classes_from) if p is not None)]
    check_output(out_dir, kind="dir", reads=reads, flag="OUT_DIR")
    layout = labelled_source(src, devkit, classes_from, split, options)
    if max_bad_fraction is None:
        max_bad_fraction = LISTED_MAX_BAD if isinstance(layout, Records) else 1.0
    if split != "train" and set(layout.splits) != {split}:
        raise BadInputError(f"{src}: its layout names its splits ({', '.join(layout.splits)}); "
                            "drop --split")
    if val_fraction and "val" in layout.splits:
        where = layout.layout if isinstance(layout, Records) else layout.roots["val"]
        raise BadInputError(f"{src}: its val split is given ({where}); drop --val-fraction")
    splits: dict[str, Sequence[Item]] = {}
    for name, files in layout.splits.items():
        if isinstance(layout, Records):
            items = list(files)
        else:
            keys = _unique_keys([os.path.relpath(f, layout.roots[name]) for f, _ in files])
            items = [Item(k, y, lambda f=f: load_image_file(f), f)
                     for k, (f, y) in zip(keys, files, strict=True)]
        if isinstance(layout, Records) and layout.ordered:
            splits[name] = items
            continue
        order = np.random.default_rng(seed).permutation(len(items))
        splits[name] = [items[i] for i in order]
    if val_fraction:
        train = splits.pop(split)
        n_val = round(len(train) * val_fraction)
        n_val = max(n_val, 1) if len(train) > 1 else n_val
        splits = {split: train[n_val:], **splits}
        if n_val:
            splits["val"] = train[:n_val]
    summary = write_dataset(splits, out_dir, classes=layout.classes,
                            class_names=layout.class_names, shard_size_mb=shard_size_mb,
                            overwrite=overwrite, max_per_shard=max_per_shard, source=str(src),
                            progress=progress, max_bad_fraction=max_bad_fraction)
    summary.layout = layout.layout if isinstance(layout, Records) else None
    return summary


def _check_numbers(shard_size_mb: float, max_per_shard: int | None, val_fraction: float = 0,
                   seed: int = 0, max_bad_fraction: float = 1.0) -> None:
    """Each number in its range, before any work (nan and inf are in none)."""
    if not (math.isfinite(max_bad_fraction) and 0 <= max_bad_fraction <= 1):
        raise BadInputError(f"--max-bad-fraction {max_bad_fraction}: must be in [0, 1]")
    if not (math.isfinite(shard_size_mb) and 0 < shard_size_mb <= MAX_SHARD_MB):
        raise BadInputError(f"--shard-size-mb {shard_size_mb}: must be a number of MB in "
                            f"(0, {MAX_SHARD_MB}]")
    if max_per_shard is not None and max_per_shard < 1:
        raise BadInputError(f"--max-per-shard {max_per_shard}: must be at least 1")
    if not (math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise BadInputError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if not 0 <= seed < 2**63:
        raise BadInputError(f"--seed {seed}: must be in [0, 2^63)")


def write_dataset(
    splits: dict[str, Sequence[Item]],
    out_dir: Path,
    *,
    classes: tuple[str, ...] | None,
    class_names: tuple[str, ...] | None = None,
    shard_size_mb: float = 100,
    max_per_shard: int | None = None,
    overwrite: bool = False,
    source: str = "",
    progress: Progress | None = None,
    max_bad_fraction: float = 1.0,
) -> ShardSummary:
    """Write prepared items as `{split}-NNNNNN.tar` shards and `shards.json` in `out_dir`;
    `class_names`: readable names of `classes`, recorded when known. A split of which no
    item could be read, or more than `max_bad_fraction` of whose items could not, is bad
    input, and leaves `out_dir` as it was."""
    _check_numbers(shard_size_mb, max_per_shard, max_bad_fraction=max_bad_fraction)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    old = _prepare_out(out_dir, overwrite)
    # New shards and index are written beside the old ones, in a hidden folder, and replace
    # them (renames only) once every one of them is complete: a failure (no readable image,
    # a full disk, Ctrl-C) leaves the old shards and index as they were.
    staging = temp_path(out_dir / ".staging")
    staging.mkdir()
    try:
        summary = _write_splits(splits, staging, classes, shard_size_mb, max_per_shard,
                                progress)
        _check_written(summary, splits, source, max_bad_fraction)
        summary.class_names = tuple(class_names) if classes and class_names else None
        atomic_write_json(staging / INDEX_NAME, {
            "format": INDEX_FORMAT,
            "classes": list(classes) if classes else None,
            "class_names": list(summary.class_names) if summary.class_names else None,
            "splits": {s: [{"name": n, "samples": c} for n, c in v]
                       for s, v in summary.splits.items()},
            "source": source,
            "skipped": len(summary.skipped),
        })
        _swap_in(staging, out_dir, old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty: what this call made, nothing else
        raise
    shutil.rmtree(staging, ignore_errors=True)
    summary.out_dir = out_dir
    return summary


def _check_written(summary: ShardSummary, splits: dict[str, Sequence[Item]],
                   source: str, max_bad_fraction: float) -> None:
    """Every split holds a sample, and no more than `max_bad_fraction` of its items were
    skipped; else bad input saying what the source held instead."""
    for split, items in splits.items():
        mine = {item.origin or item.key for item in items}
        bad = [(f, r) for f, r in summary.skipped if f in mine]
        # the fraction, not F * n: 29 of 100 is 0.29, while 0.29 * 100 is 28.999999999999996
        if summary.samples(split) and len(bad) / len(items) > max_bad_fraction:
            raise BadInputError(
                f"{source or split}: {split}: {len(bad)} of {len(items)} listed images are "
                f"missing or unreadable ({len(bad) / len(items):.1%}, more than "
                f"--max-bad-fraction {max_bad_fraction:g}); the first: {bad[0][0]}: "
                f"{bad[0][1]}")
        if summary.samples(split) or not items:
            continue
        reasons = Counter(r for _, r in bad).most_common(2)
        why = "; ".join(f"{n} {r}" for r, n in reasons)
        raise BadInputError(f"{source or split}: nothing to shard in {split}: {len(items)} "
                            f"file{'s' if len(items) > 1 else ''}, none a readable image "
                            f"({why})")


def _write_splits(splits: dict[str, Sequence[Item]], where: Path,
                  classes: tuple[str, ...] | None, shard_size_mb: float,
                  max_per_shard: int | None, progress: Progress | None) -> ShardSummary:
    summary = ShardSummary(where, {}, classes)
    total, done = sum(len(v) for v in splits.values()), 0
    for split, items in splits.items():
        sink = _ShardSink(where, split, int(shard_size_mb * 1e6), max_per_shard)
        labels: set[int] = set()
        try:
            for item in items:
                try:
                    ext, data = item.load()
                    sink.add(item.key, ext, data, item.label)
                    labels.add(item.label)
                except BadSample as err:
                    summary.skipped.append((item.origin or item.key, str(err)))
                done += 1
                if progress is not None:
                    progress(done, total)
            sink.finish()
        finally:
            sink.abort()  # removes a half-written shard (no-op after finish)
        summary.splits[split] = sink.done
        summary.split_classes[split] = len(labels - {-1})
        summary.bytes_written += sink.bytes_total
    return summary


def _swap_in(staging: Path, out_dir: Path, old: list[Path]) -> None:
    """Replace the old shards and index with the complete new ones, by renames: the old
    index goes first and the new one comes last, so a reader never finds an index naming
    shards that are not there, or not those it counted."""
    new = sorted(p for p in staging.iterdir() if p.name != INDEX_NAME)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for p in new:
        os.replace(p, out_dir / p.name)
    kept = {p.name for p in new}
    for p in old:
        if p.name not in kept:
            p.unlink(missing_ok=True)
    os.replace(staging / INDEX_NAME, out_dir / INDEX_NAME)
    fsync_dir(out_dir)


def _prepare_out(out_dir: Path, overwrite: bool) -> list[Path]:
    """Check `out_dir` and return what the new shards will replace: the shards, the index
    and temporaries of an interrupted write (`.*.partial`: the name older versions used).
    Nothing is removed here."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"{out_dir}: exists and is not a directory")
    old: list[Path] = []
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise BadInputError(f"{out_dir}: not empty; pass --overwrite to replace its shards")
        old = [p for p in out_dir.iterdir()
               if p.name == INDEX_NAME or (is_temp_name(p.name) and p.is_file())
               or re.fullmatch(r"(train|val|test)-\d{6}\.tar|\..*\.partial", p.name)]
    out_dir.mkdir(parents=True, exist_ok=True)
    return old


def _unique_keys(rel_paths: list[str]) -> list[str]:
    """Tar-safe, unique keys: a key may not contain a dot (WebDataset splits there)."""
    seen: set[str] = set()
    out = []
    for rel in rel_paths:
        stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
        base = re.sub(r"[^A-Za-z0-9_/-]", "_", stem.replace(os.sep, "/")).strip("/") or "_"
        key, n = base, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        out.append(key)
    return out


class _ShardSink:
    """Fills `{prefix}-NNNNNN.tar` files one after another, each atomically."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int, max_items: int | None) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_bytes, self.max_items = max_bytes, max_items
        self.done: list[tuple[str, int]] = []
        self.bytes_total = 0
        self.out: AtomicFile | None = None
        self.tar: tarfile.TarFile | None = None
        self.count = self.size = 0

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        cost = len(data) + 2048  # two headers + padding, roughly
        full = self.max_items is not None and self.count >= self.max_items
        if self.tar is not None and (full or self.size + cost > self.max_bytes):
            self.finish()
        if self.tar is None:
            self._start()
        self._member(f"{key}.{ext}", data)
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
        self.count, self.size = self.count + 1, self.size + cost

    def _start(self) -> None:
        self.name = f"{self.prefix}-{len(self.done):06d}.tar"
        self.out = AtomicFile(self.out_dir / self.name, "wb")  # committed in finish
        self.tar = tarfile.open(fileobj=self.out.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.count = self.size = 0

    def _member(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644  # fixed metadata: same bytes each run
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        self.tar.addfile(ti, io.BytesIO(data))

    def finish(self) -> None:
        """Close the open shard and give it its final name."""
        if self.tar is None or self.out is None:
            return
        self.tar.close()
        self.bytes_total += self.out.file.tell()
        self.out.commit()
        self.done.append((self.name, self.count))
        self.out = self.tar = None

    def abort(self) -> None:
        """Drop a shard left open by an error."""
        if self.out is not None:
            self.out.discard()
            self.out = self.tar = None
