"""From `data.train` / `data.val` to a list of shards, with sample counts where knowable.

Accepted forms (a list mixes them):
- a brace pattern of tar files, `/data/in1k/train-{000000..001023}.tar`, or a glob of local
  ones, `/data/in1k/train-*.tar` (a URL cannot be globbed: the message says to use braces);
- a `pipe:` command or `http(s)://` URL pattern;
- a directory written by `cratemae shard` (its `shards.json` gives names and counts):
  `data.train` reads its `train` split and `data.val` its `val` split (else its `test`);
- a directory of tar files: all of them, unless their names say they hold several splits
  (`train-*.tar` beside `val-*.tar`, or `imagenet1k-train-0000.tar` beside
  `imagenet1k-validation-00.tar`), then those of the split asked for; with timm's and
  Hugging Face's `_info.json` (`timm/imagenet-1k-wds`), the tars it lists for the split
  (`validation` is read as data.val) with the counts it gives them; a directory of
  images (class sub-folders give labels; flat = unlabelled), or one whose sub-folders are
  the splits (`train/`, `val/`), read as the split asked for; the root of Kaggle's ImageNet
  (`ILSVRC/Data/CLS-LOC`, its val split labelled by `LOC_val_solution.csv`); a download
  format read in place (`layouts.read_in_place`: CIFAR's batch files, Parquet files, one
  shard per batch file or row group; Flowers-102's and Pets' images), data.val reading its
  val split, else its test split, labelled as `cratemae shard` labels it;
- `demo:train` / `demo:val`, the built-in demo data set.
Counts of tars without a `shards.json` or an `_info.json` giving them are found by reading
them once (local tars: their headers; `pipe:`/URL shards: one pass over the stream, unless
training with `data.epoch_samples`) and cached: `cratemae.data.counts.fill_counts`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from cratemae.data.folders import (
    INDEX_NAME,
    SPLIT_WORDS,
    WdsInfo,
    list_images,
    read_index,
    read_wds_info,
    split_folders,
)
from cratemae.data.imagenet import (
    is_kaggle_root,
    kaggle_dataset,
    reference_classes,
    relabel,
    unlabelled_val_reason,
)
from cratemae.data.layouts import InPlace, read_in_place
from cratemae.data.shards import (
    Shard,
    is_remote,
)
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["Source", "resolve_source"]

log = logging.getLogger("cratemae.data")

# Image folders are cut into virtual shards of this many files (they read randomly, so the
# size only sets how finely the epoch's order is shuffled).
FOLDER_SHARD = 256
_SPLIT_RE = re.compile(r"^([A-Za-z]+)(?:[-_.]|\d|$)")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """The shards behind one `data.train`/`data.val` value."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...] | None = None  # label i is classes[i] (ids: synsets, folders)
    # Image folders: any slice of a shard is as cheap to read as the whole.
    random_access: bool = False
    # Readable names of the labels ("tench, Tinca tinca"), where the data's metadata has them.
    class_names: tuple[str, ...] | None = None

    @property
    def counts_known(self) -> bool:
        return all(s.count is not None for s in self.shards)


def resolve_source(spec: str | list[str] | None, split: str) -> Source:
    """Resolve one recipe value; `split` ("train"/"val") names it in errors."""
    if spec is None or (isinstance(spec, list) and not spec):
        raise BadInputError(
            f"data.{split} is not set: give a shard pattern, folder or demo:{split}"
        )
    parts = [_resolve_one(s, split) for s in ([spec] if isinstance(spec, str) else spec)]
    classes = {p.classes for p in parts if p.classes is not None}
    if len(classes) > 1:
        raise BadInputError(f"data.{split}: its sources disagree on the class names")
    shards = tuple(s for p in parts for s in p.shards)
    if not shards:
        raise BadInputError(f"data.{split} = {spec!r}: no shards or images found")
    _refuse_one_file_twice(shards, split)
    names = next((p.class_names for p in parts if p.class_names is not None), None)
    return Source(shards, next(iter(classes), None), all(p.random_access for p in parts),
                  names)


def _refuse_one_file_twice(shards: tuple[Shard, ...], split: str) -> None:
    """Two local tar shards that are one file (a link, a path spelled twice, a list naming it
    twice) would have its samples read twice: bad input naming both."""
    seen: dict[tuple[int, int], int] = {}
    for i, s in enumerate(shards):
        if s.files is not None or s.records is not None or is_remote(s.url):
            continue
        try:
            st = os.stat(s.url)
        except OSError:
            continue  # a missing tar is the reader's to report
        first = seen.setdefault((st.st_dev, st.st_ino), i)
        if first != i:
            raise BadInputError(f"data.{split}: {s.url} and {shards[first].url} are one file; "
                                "its samples would be read twice")


def _resolve_one(spec: str, split: str) -> Source:
    if spec.startswith("demo:"):
        from cratemae.data.demo import ensure_demo  # the demo builds itself on first use

        if spec not in ("demo:train", "demo:val"):
            raise BadInputError(
                f"data.{split} = {spec!r}: the demo splits are demo:train, demo:val"
            )
        return _from_index(ensure_demo(), spec.removeprefix("demo:"), split)
    if is_remote(spec):
        from webdataset.shardlists import expand_urls

        if not spec.startswith("pipe:") and _GLOB_CHARS.search(spec):
            raise BadInputError(
                f"data.{split} = {spec!r}: a URL cannot be globbed; give a brace pattern, "
                "e.g. https://host/train-{000000..000099}.tar")
        return Source(tuple(Shard(u) for u in expand_urls(spec)))
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _from_index(path, split, split)
        tars = _tars_in(path)
        if tars:
            info = read_wds_info(path)
            if info is not None and info.splits:
                return _from_wds_info(path, info, split)
            tars = _tars_of_split(path, tars, split)
            return _with_info(Source(tuple(Shard(str(p), _indexed_count(p)) for p in tars)),
                              info)
        if is_kaggle_root(path):
            return _from_kaggle(path, split)
        in_place = read_in_place(path, split)
        if in_place is not None:
            return _from_download(path, in_place, split)
        return _from_folder(path, split)
    if path.suffix == ".parquet" and regular_file(path).is_file():
        return _from_download(path, read_in_place(path, split), split)
    from webdataset.shardlists import expand_urls

    shards = []
    for url in expand_urls(str(path)):
        for file in _glob(url, split, spec):
            if not regular_file(file, "shard").is_file():
                raise BadInputError(f"{file}: shard file not found (data.{split} = {spec!r})")
            shards.append(Shard(file, _indexed_count(Path(file))))
    parents = {Path(s.url).parent for s in shards}
    parent = parents.pop() if len(parents) == 1 else None
    if parent is not None and (parent / INDEX_NAME).is_file():
        # Tars `cratemae shard` wrote (`/data/flowers102/test-*.tar`): its classes, too.
        index = read_index(parent)
        classes, names = index.get("classes"), index.get("class_names")
        return Source(tuple(shards), tuple(classes) if classes else None,
                      class_names=tuple(names) if classes and names else None)
    info = read_wds_info(parent) if parent is not None else None
    return _with_info(Source(tuple(shards)), info)


def _with_info(source: Source, info: WdsInfo | None) -> Source:
    """`source` with the class ids and names an `_info.json` gives, if any."""
    if info is None:
        return source
    return replace(source, classes=info.classes, class_names=info.class_names)


def _from_wds_info(directory: Path, info: WdsInfo, split: str) -> Source:
    """The tars `_info.json` lists for `split` (its `validation` is data.val), with the
    counts it gives: read directly, no counting pass."""
    mine = [s for s in info.splits if SPLIT_WORDS.get(s.lower(), s.lower()) == split]
    if not mine:
        have = ", ".join(info.splits) or "none"
        raise BadInputError(f"data.{split} = {directory}: its {info.path.name} has no "
                            f"{split!r} split (it has: {have}); set data.{split} to other data")
    files = info.splits[mine[0]]
    if not files:  # the split names no files: its tars are those its name begins
        tars = _tars_in(directory)
        return _with_info(Source(tuple(Shard(str(p), _indexed_count(p))
                                       for p in _tars_of_split(directory, tars, split))), info)
    absent = [n for n, _ in files if not regular_file(directory / n, "shard").is_file()]
    if absent:
        raise BadInputError(
            f"{directory / absent[0]}: shard file not found ({len(absent)} of the "
            f"{len(files)} {mine[0]} tars listed in {info.path} are missing); to read the "
            f"ones there, give a pattern of them, e.g. {directory}/*{mine[0]}*.tar")
    shards = tuple(Shard(str(directory / n), c) for n, c in files)
    return _with_info(Source(shards), info)


def _tars_in(directory: Path) -> list[Path]:
    """The `*.tar` files of a folder, sorted; one that is a FIFO, socket or device is
    refused (`guard.regular_file`), not skipped: skipping it would make the epoch a shard
    short, silently."""
    return sorted(regular_file(p, "shard") for p in directory.iterdir()
                  if p.name.endswith(".tar") and not p.is_dir())


def _glob(pattern: str, split: str, spec: str) -> list[str]:
    """The files a glob pattern names, sorted (a name without glob characters as it is)."""
    if not _GLOB_CHARS.search(pattern):
        return [pattern]
    found = sorted(glob.glob(pattern))
    if not found:
        raise BadInputError(f"data.{split} = {spec!r}: no file matches {pattern}")
    return found


def _split_of(name: str) -> str | None:
    """The split a file or folder name begins with (`train-000001.tar` -> "train"), or
    else the one a later word of it names (`imagenet1k-validation-00.tar` -> "val")."""
    m = _SPLIT_RE.match(name)
    if m and m.group(1).lower() in SPLIT_WORDS:
        return SPLIT_WORDS[m.group(1).lower()]
    words = {SPLIT_WORDS.get(w.lower()) for w in re.split(r"[-_.]", name)[1:]} - {None}
    return words.pop() if len(words) == 1 else None


def _tars_of_split(directory: Path, tars: list[Path], split: str) -> list[Path]:
    """The tars of a folder to read as `split`: all of them, unless their names say they
    hold several splits (`train-*.tar` beside `val-*.tar`): reading those whole would mix
    validation images into training, silently."""
    named = {p: _split_of(p.name) for p in tars}
    splits = sorted({s for s in named.values() if s is not None})
    if len(splits) <= 1:
        if splits and splits[0] != split:
            log.warning("data.%s = %s: its shards are all named %s-*", split, directory,
                        splits[0])
        return tars
    mine = [p for p in tars if named[p] == split]
    if not mine:
        raise BadInputError(
            f"data.{split} = {directory}: holds the shards of several splits "
            f"({', '.join(splits)}), none named {split}-*: give a brace pattern of the ones "
            f"to read, e.g. {_brace_pattern([p for p in tars if named[p] == splits[0]])}")
    log.info("data.%s = %s: reading its %d %s shards (of %d; the others are %s)", split,
             directory, len(mine), split, len(tars),
             ", ".join(s for s in splits if s != split) or "unnamed")
    return mine


def _brace_pattern(paths: list[Path]) -> str:
    """A brace pattern for numbered files (`d/train-{000000..000009}.tar`), else the first."""
    parts = [re.match(r"^(.*?)(\d+)(\.tar)$", str(p)) for p in paths]
    if len(paths) > 1 and all(parts) and len({(m.group(1), len(m.group(2)))
                                              for m in parts if m}) == 1:
        nums = sorted(m.group(2) for m in parts if m)
        head = parts[0]
        assert head is not None
        return f"{head.group(1)}{{{nums[0]}..{nums[-1]}}}.tar"
    return str(paths[0])


def _from_index(directory: Path, split: str, field: str) -> Source:
    index = read_index(directory)
    if split == "val" and "val" not in index["splits"] and "test" in index["splits"]:
        # A data set with train and test only (CIFAR, Pets): test is what it is scored on.
        log.info("data.%s = %s: it has no val split; reading its test split", field, directory)
        split = "test"
    if split not in index["splits"]:
        have = ", ".join(index["splits"]) or "none"
        raise BadInputError(
            f"{directory}: has no {split!r} split (it has: {have}); for a val split rerun "
            f"cratemae shard with --val-fraction (or shard a val folder with --split val), "
            f"or set data.{field} to other data"
        )
    shards = []
    for e in index["splits"][split]:
        p = directory / e["name"]
        if not regular_file(p, "shard").is_file():
            raise BadInputError(f"{p}: shard file not found (listed in {directory / INDEX_NAME})")
        shards.append(Shard(str(p), int(e["samples"])))
    classes, names = index.get("classes"), index.get("class_names")
    return Source(tuple(shards), tuple(classes) if classes else None,
                  class_names=tuple(names) if classes and names else None)


_INDEX_CACHE: dict[str, dict[str, int]] = {}


def _indexed_count(path: Path) -> int | None:
    """The count a `shards.json` or an `_info.json` beside a tar gives it, if any."""
    d = str(path.parent)
    if d not in _INDEX_CACHE:
        counts: dict[str, int] = {}
        if (path.parent / INDEX_NAME).is_file():
            for entries in read_index(path.parent)["splits"].values():
                counts.update({e["name"]: int(e["samples"]) for e in entries})
        elif (info := read_wds_info(path.parent)) is not None:
            counts = info.counts()
        _INDEX_CACHE[d] = counts
    return _INDEX_CACHE[d].get(path.name)


def _from_folder(root: Path, split: str) -> Source:
    found = split_folders(root)
    folder = _split_folder(root, found, split)
    files, classes = list_images(folder)
    if not files:
        raise BadInputError(f"{folder}: no shards.json, tar files or images (data.{split})")
    if split != "train" and "train" in found and classes is not None:
        # Labels as train/ numbers its classes (as `cratemae shard` writes them), not by
        # this split's own folders: a val/ lacking a class would shift every label after it.
        try:
            ref, _ = reference_classes(found["train"])
        except BadInputError:
            raise BadInputError(f"{folder}: has class folders, but {found['train']} has "
                                "none") from None
        files, classes = relabel(files, classes, ref, str(folder)), ref
    if split == "val" and classes is None:
        _say_unlabelled(root, folder)
    return Source(_folder_shards(folder, files), classes, random_access=True)


_SAID: set[Path] = set()  # the unlabelled val folders already logged: once per process


def _say_unlabelled(root: Path, folder: Path) -> None:
    """One log line: a val folder without class folders has no labels, so no k-NN figure."""
    if folder in _SAID:
        return
    _SAID.add(folder)
    reason = unlabelled_val_reason(folder)
    if reason:
        log.warning("data.val = %s: %s; the k-NN accuracy will be absent", root, reason)
    else:
        log.info("data.val = %s: %s has no class sub-folders, so no labels; the k-NN "
                 "accuracy will be absent", root, folder)


def _folder_shards(root: Path, files: list[tuple[str, int]]) -> tuple[Shard, ...]:
    """Labelled files cut into virtual shards of FOLDER_SHARD files."""
    return tuple(
        Shard(f"{root}#{i // FOLDER_SHARD}", len(chunk), tuple(chunk))
        for i in range(0, len(files), FOLDER_SHARD)
        for chunk in [files[i : i + FOLDER_SHARD]]
    )


def _from_kaggle(root: Path, split: str) -> Source:
    """Kaggle's ImageNet read in place: the train synset folders, the val images labelled
    by LOC_val_solution.csv in the same (sorted synset) numbering."""
    layout = kaggle_dataset(root)
    if split not in layout.splits:
        raise BadInputError(f"data.{split} = {root}: Kaggle's layout there has no {split}/ "
                            "folder under ILSVRC/Data/CLS-LOC")
    log.info("data.%s = %s: reading Kaggle's ImageNet layout, %s split", split, root, split)
    return Source(_folder_shards(layout.roots[split], layout.splits[split]), layout.classes,
                  random_access=True, class_names=layout.class_names)


def _from_download(root: Path, found: InPlace | None, split: str) -> Source:
    """A download format read in place (`layouts.read_in_place`): its batch files or row
    groups as shards of records, or its image files as folder shards; labelled as its
    shards would be."""
    if found is None:
        raise BadInputError(f"data.{split} = {root}: not a Parquet data set")
    log.info("data.%s = %s: reading %s in place, its %s split", split, root, found.layout,
             found.split)
    shards = tuple(Shard(name, n, records=piece) for name, n, piece in found.slices)
    if found.files:
        shards += _folder_shards(root, found.files)
    return Source(shards, found.classes, random_access=True, class_names=found.class_names)


def _split_folder(root: Path, found: dict[str, Path], split: str) -> Path:
    """`root/SPLIT` when the sub-folders of `root` are splits (`found`, from
    `folders.split_folders`: the rule `cratemae shard` follows too), which would otherwise
    be read as classes of one mixed set; else `root`."""
    if not found:
        return root
    if split not in found:
        have = ", ".join(p.name for p in found.values())
        raise BadInputError(f"data.{split} = {root}: its sub-folders are splits ({have}), none "
                            f"of them {split}: give the folder of the split to read")
    log.info("data.%s = %s: reading its %s/ sub-folder", split, root, found[split].name)
    return found[split]
