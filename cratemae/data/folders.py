"""What a data directory holds: the `shards.json` index that `cratemae shard` writes, and
image folders (class sub-folders give labels). Read by the sources, written by the writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from cratemae.errors import BadInputError

__all__ = ["IMAGE_EXTS", "INDEX_FORMAT", "INDEX_NAME", "list_images", "read_index"]

INDEX_NAME = "shards.json"
INDEX_FORMAT = "cratemae-shards/1"
IMAGE_EXTS = frozenset(
    ["jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"]
)

def read_index(directory: Path) -> dict:
    """The parsed, checked `shards.json` of a directory written by `cratemae shard`."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        splits = index["splits"]
        for entries in splits.values():
            for e in entries:
                if not isinstance(e["name"], str) or int(e["samples"]) < 0:
                    raise ValueError(e)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BadInputError(f"{path}: not a valid {INDEX_NAME} ({type(err).__name__})") from None
    return index


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
    class_files = {d.name: _walk_images(d, keep) for d in dirs}
    class_files = {k: v for k, v in class_files.items() if v}
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


def _walk_images(d: Path, keep: Callable[[str], bool]) -> list[str]:
    """Files under `d`, following links to folders, each real folder once: a link back up
    the tree (a loop) is not followed a second time."""
    out, seen = [], set()
    for base, subdirs, files in os.walk(d, followlinks=True):
        real = os.stat(base)
        if (real.st_dev, real.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((real.st_dev, real.st_ino))
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        out += [os.path.join(base, f) for f in sorted(files) if keep(f)]
    return out


