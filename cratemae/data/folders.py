"""What a data directory holds: the `shards.json` index that `cratemae shard` writes, the
`_info.json` of timm's and Hugging Face's WebDataset sets, and image folders (class
sub-folders give labels). Read by the sources, written by the writer."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cratemae.errors import BadInputError

__all__ = [
    "IMAGE_EXTS",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "SPLIT_WORDS",
    "WDS_INFO_NAMES",
    "WdsInfo",
    "list_images",
    "read_index",
    "read_wds_info",
    "split_folders",
]

log = logging.getLogger("cratemae.data")

INDEX_NAME = "shards.json"
INDEX_FORMAT = "cratemae-shards/1"
IMAGE_EXTS = frozenset(
    ["jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"]
)
# timm's reader looks for these beside the tars, in this order.
WDS_INFO_NAMES = ("_info.json", "info.json")
_SYNSET = re.compile(r"^n\d{8}$")
# A split's name as it begins shard or folder names: `train-000000.tar`, `val_01.tar`, `val/`.
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test"}
# The most samples a count may declare: beyond it a count is a lie, not a data set (and
# no longer exact as a float).
MAX_COUNT = 2**53


@dataclass(frozen=True)
class WdsInfo:
    """What an `_info.json` says: for each split (its own name: "train", "validation") the
    tar names and per-tar sample counts, as far as given; and the class names, if any."""

    path: Path
    # split -> (file name relative to the info's folder, samples or None) for each tar;
    # empty when the split names no files.
    splits: dict[str, tuple[tuple[str, int | None], ...]] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None  # synset ids, when that is what the names are
    class_names: tuple[str, ...] | None = None  # readable names

    def counts(self) -> dict[str, int]:
        """File name -> samples, for every tar whose count is given."""
        return {n: c for files in self.splits.values() for n, c in files if c is not None}

def read_index(directory: Path) -> dict:
    """The parsed, checked `shards.json` of a directory written by `cratemae shard`: every
    entry has a name and a whole, non-negative sample count (bad input naming the key), no
    tar is listed twice (its samples would be read twice) and every tar beside it is listed
    (its samples would be left out, silently)."""
    path = directory / INDEX_NAME
    listed: dict[str, str] = {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        splits = index["splits"]
        entries = [(f"splits.{s}[{i}]", e) for s, v in splits.items() for i, e in enumerate(v)]
        for key, e in entries:
            name = e["name"]
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
                raise BadInputError(f"{path}: {key}.name = {name!r:.60} is not the "
                                    "name of a file beside it")
            if name in listed:
                raise BadInputError(f"{path}: {key}.name = {name!r:.60} is listed twice (also "
                                    f"{listed[name]}); its samples would be read twice")
            listed[name] = key
            whole_count(e["samples"], path, f"{key}.samples")
        tars = sorted(p.name for p in directory.iterdir()
                      if p.name.endswith(".tar") and not p.name.startswith("."))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BadInputError(f"{path}: not a valid {INDEX_NAME} ({type(err).__name__})") from None
    unlisted = [t for t in tars if t not in listed]
    if unlisted:
        raise BadInputError(f"{directory / unlisted[0]}: a tar that {path} does not list "
                            f"({len(unlisted)} such); its samples would be left out: move it "
                            "elsewhere, or write the shards again with cratemae shard")
    return index


def whole_count(value: object, path: Path, key: str) -> int:
    """`value` as a sample count declared by `path` under `key`: a whole number, 0 to
    MAX_COUNT (not 12.5, "12", true, null, -1 or 1e30), else bad input naming both."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:  # bool is no count
        raise BadInputError(f"{path}: {key} = {value!r:.40} is not a whole number "
                            f"of samples (0 to {MAX_COUNT})")
    return value


def read_wds_info(directory: Path) -> WdsInfo | None:
    """The `_info.json` (timm's name; `info.json` too) of a folder of WebDataset tars, as
    timm's and Hugging Face's `timm/imagenet-1k-wds` have it: {"splits": {"train":
    {"num_samples", "filenames", "shard_lengths"}, "validation": {...}}}, optionally with
    HF's {"features": {"cls": {"names": [...]}}}. None when there is none, or when it is not
    a JSON object with "splits" (another program's info file: warned about and ignored);
    counts or file names there that are wrong are bad input naming the file and the key."""
    path = next((directory / n for n in WDS_INFO_NAMES if (directory / n).is_file()), None)
    if path is None:
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: ignored, not a WebDataset info file (%s: %s)", path,
                    type(err).__name__, err)
        return None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        log.warning("%s: ignored, not a WebDataset info file (no \"splits\" table)", path)
        return None
    splits = {str(k): _wds_split(v, path, f"splits.{k}") for k, v in info["splits"].items()}
    names = _feature_names(info.get("features"))
    ids = names if names and all(_SYNSET.match(n) for n in names) else None
    return WdsInfo(path, splits, ids, None if ids else names)


def _wds_split(entry: object, path: Path, key: str) -> tuple[tuple[str, int | None], ...]:
    if not isinstance(entry, dict):
        raise BadInputError(f"{path}: {key} is not a table")
    files = entry.get("filenames") or []
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise BadInputError(f"{path}: {key}.filenames is not a list of file names")
    twice = next((f for f, n in Counter(files).items() if n > 1), None)
    if twice is not None:
        raise BadInputError(f"{path}: {key}.filenames lists {twice!r:.60} twice; its samples "
                            "would be read twice")
    total = entry.get("num_samples")  # null: not given
    total = None if total is None else whole_count(total, path, f"{key}.num_samples")
    lengths = entry.get("shard_lengths")
    if lengths is None:
        if len(files) != 1 or total is None:
            return tuple((f, None) for f in files)
        lengths = [total]  # one tar: the split's count is its count
    if not isinstance(lengths, list) or (files and len(lengths) != len(files)):
        raise BadInputError(f"{path}: {key}.shard_lengths is not a list of one count per file "
                            f"of {key}.filenames ({len(files)})")
    counts = [whole_count(n, path, f"{key}.shard_lengths[{i}]") for i, n in enumerate(lengths)]
    if not files:  # the split names no files: its tars are found by their names
        return ()
    if total is not None and total != sum(counts):
        raise BadInputError(f"{path}: {key}.num_samples = {total}, but its shard_lengths add "
                            f"up to {sum(counts)}")
    return tuple(zip(files, counts, strict=True))


def _feature_names(features: object) -> tuple[str, ...] | None:
    """The class names of a Hugging Face `features` table (a ClassLabel's "names")."""
    if not isinstance(features, dict):
        return None
    for key in ("cls", "label", *features):
        names = features.get(key, {}).get("names") if isinstance(features.get(key), dict) else None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return tuple(names)
    return None


def list_images(
    root: Path, any_file: bool = False
) -> tuple[list[tuple[str, int]], tuple[str, ...] | None]:
    """Image files under `root` as (path, label), sorted; class folders give labels
    (sorted names -> 0, 1, ...), a flat folder gives label -1 and no classes. `any_file`
    lists every non-hidden file, so a writer can report the ones that are not images."""
    keep = _is_visible if any_file else _is_image_name
    top = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    dirs = [p for p in top if p.is_dir()]
    flat = [str(p) for p in top if p.is_file() and keep(p.name)]
    # real folder -> (class, path) of the walk that reached it first; the root: no class
    owner: dict[tuple[int, int], tuple[str | None, str]] = {_real(str(root)): (None, str(root))}
    for d in dirs:
        if (first := owner.setdefault(_real(str(d)), (d.name, str(d)))) != (d.name, str(d)):
            raise BadInputError(f"{d}: is the folder {first[1]} (a link); its images would "
                                "be read twice")
    class_files = {d.name: _walk_images(d, keep, owner) for d in dirs}
    empty = sorted(k for k, v in class_files.items() if not v)
    class_files = {k: v for k, v in class_files.items() if v}
    if empty and class_files:
        log.warning("%s: %d folder(s) hold no image and are not classes (%s); the classes "
                    "are numbered without them", root, len(empty), ", ".join(empty[:5]))
    if class_files and flat:
        raise BadInputError(f"{root}: has both images and class folders; move {flat[0]} into one")
    if not class_files:
        return [(f, -1) for f in flat], None
    classes = tuple(sorted(class_files))
    return [(f, i) for i, c in enumerate(classes) for f in class_files[c]], classes


def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS and not name.startswith(".")


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _real(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_images(d: Path, keep: Callable[[str], bool],
                 owner: dict[tuple[int, int], tuple[str | None, str]]) -> list[str]:
    """Files under class folder `d`, following links to folders, each real folder once: a
    link back up its own tree (a loop) is not followed a second time. A link to a folder
    that another class (or the root above the classes) reaches is bad input: its images
    would be read twice, once under the wrong class."""
    out, seen = [], set()
    for base, subdirs, files in os.walk(d, followlinks=True):
        real = _real(base)
        cls, first = owner.setdefault(real, (d.name, base))
        if cls != d.name:
            where = f"class {cls}" if cls is not None else "the root of the classes"
            raise BadInputError(f"{base}: is the folder {first} (a link), of {where}; its "
                                f"images would be read twice, once labelled {d.name}")
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        out += [os.path.join(base, f) for f in sorted(files) if keep(f)]
    return out




def split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when every visible sub-folder of `root` is named after a split
    (`train/`, `val/`, `Validation/`, `test/`): then they are its splits, not classes of one
    mixed set. Empty otherwise. The one rule of `cratemae shard` and of the readers.
    Two folders of one split (`val/` beside `validation/`) are bad input."""
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = {p: SPLIT_WORDS.get(p.name.lower()) for p in subs}
    if not subs or not all(names.values()):
        return {}
    found: dict[str, Path] = {}
    for p in subs:
        split = names[p]
        assert split is not None
        if split in found:
            raise BadInputError(f"{root}: its sub-folders {found[split].name}/ and {p.name}/ "
                                f"both name the {split} split; keep one")
        found[split] = p
    return found
