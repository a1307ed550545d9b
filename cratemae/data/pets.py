"""Oxford-IIIT Pets as downloaded from robots.ox.ac.uk (and by torchvision's
`OxfordIIITPet`): `images/NAME.jpg` and `annotations/trainval.txt`, `annotations/test.txt`,
one image a line, "NAME CLASS_ID SPECIES BREED_ID" (CLASS_ID 1..37). Label = CLASS_ID - 1,
as torchvision gives it; the class names are the file-name prefixes ("Abyssinian_12" ->
"Abyssinian", "american_bulldog_3" -> "american_bulldog"). The trainval split is written
as train. An image listed but missing, or not a readable image (the real set has a few),
is a skipped sample, as any bad file is. The real lists are disjoint, name each image once
and each breed by one class id: a repeat, an image in both lists, two ids of one breed, or a
NAME that is not a plain file name (a path, a dot) is bad input.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from cratemae.data.records import Item, Records, load_image_file
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["CLASSES", "is_pets_root", "pets_records"]

log = logging.getLogger("cratemae.data")

CLASSES = 37
_SPLITS = {"train": "trainval.txt", "test": "test.txt"}


def _folder(root: Path) -> Path | None:
    """`root`, or its `oxford-iiit-pet/` (torchvision's folder), when it holds the download."""
    for folder in (root, root / "oxford-iiit-pet"):  # a list missing: said, not skipped
        if (folder / "images").is_dir() and any(
                os.path.lexists(folder / "annotations" / f) for f in _SPLITS.values()):
            return folder
    return None


def is_pets_root(root: Path) -> bool:
    return _folder(root) is not None


def read_list(path: Path) -> list[tuple[str, int]]:
    """(NAME, CLASS_ID) of each line; a line that is not "NAME ID SPECIES BREED" with ID in
    1..37 is bad input naming the line."""
    try:
        lines = regular_file(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: unreadable ({type(err).__name__})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        ok = len(fields) == 4 and fields[1].isascii() and fields[1].isdigit()
        if not ok or not 1 <= int(fields[1]) <= CLASSES:
            raise BadInputError(f'{path}: line {n}: "{line.strip()[:60]}" is not "NAME CLASS_ID '
                                f'SPECIES BREED_ID" with CLASS_ID in 1..{CLASSES}')
        if not re.fullmatch(r"[\w-]+", fields[0]):  # a file name's stem, no path nor dot
            raise BadInputError(f'{path}: line {n}: "{fields[0][:60]}" is not the name of an '
                                'image of images/ (letters, digits, _ and -)')
        out.append((fields[0], int(fields[1])))
    if not out:
        raise BadInputError(f"{path}: lists no images")
    return out


def _class_names(listed: dict[str, list[tuple[str, int]]], folder: Path) -> tuple[str, ...]:
    """The name of each class id: the prefix its images' names share."""
    names: dict[int, tuple[str, str]] = {}  # id -> (prefix, the image it came from)
    for name, cid in (x for rows in listed.values() for x in rows):
        prefix = name.rsplit("_", 1)[0]
        seen = names.setdefault(cid, (prefix, name))
        if seen[0] != prefix:
            raise BadInputError(f"{folder / 'annotations'}: class {cid} holds {seen[1]} and "
                                f"{name}, whose names disagree on the breed")
    ids = {}  # prefix -> the first class id named by it
    for cid, (prefix, name) in sorted(names.items()):
        if ids.setdefault(prefix, (cid, name))[0] != cid:
            raise BadInputError(f"{folder / 'annotations'}: classes {ids[prefix][0]} and {cid} "
                                f"both hold {prefix} images ({ids[prefix][1]}, {name})")
    unseen = [i for i in range(1, CLASSES + 1) if i not in names]
    if unseen:
        log.warning("%s: the annotations list no image of class %s", folder,
                    ", ".join(map(str, unseen[:5])))
    return tuple(names[i][0] if i in names else f"class_{i}" for i in range(1, CLASSES + 1))


def pets_records(root: Path) -> Records:
    """The trainval (written as train) and test splits, labelled by the annotations."""
    folder = _folder(root)
    if folder is None:
        raise BadInputError(f"{root}: --layout pets: holds no images/ and "
                            "annotations/trainval.txt, annotations/test.txt (nor an "
                            "oxford-iiit-pet/ folder with them)")
    absent = [f"annotations/{f}" for f in _SPLITS.values()
              if not regular_file(folder / "annotations" / f).is_file()]
    if absent:
        raise BadInputError(f"{folder}: Oxford-IIIT Pets without its {', '.join(absent)}")
    listed = {s: read_list(folder / "annotations" / f) for s, f in _SPLITS.items()}
    where: dict[str, str] = {}
    for s, rows in listed.items():
        for name, _ in rows:
            if name in where:  # the real lists are disjoint: a repeat is a duplicate or a leak
                raise BadInputError(f"{folder / 'annotations'}: {name} is listed in "
                                    f"{_SPLITS[where[name]]}"
                                    f"{' twice' if where[name] == s else f' and {_SPLITS[s]}'}")
            where[name] = s
    classes = _class_names(listed, folder)
    splits = {s: [Item(name, cid - 1, _loader(folder / "images" / f"{name}.jpg"),
                       str(folder / "images" / f"{name}.jpg")) for name, cid in rows]
              for s, rows in listed.items()}
    return Records("Oxford-IIIT Pets (trainval written as train)", splits, classes)


def _loader(path: Path) -> Callable[[], tuple[str, bytes]]:
    return lambda: load_image_file(str(path))
