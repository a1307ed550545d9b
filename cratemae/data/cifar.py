"""CIFAR-10 and CIFAR-100 as downloaded from cs.toronto.edu (and by torchvision): the
binary version and the Python version, their labels and pixels.

- binary: `cifar-10-batches-bin/data_batch_{1..5}.bin`, `test_batch.bin` and
  `batches.meta.txt` (one class name a line); `cifar-100-binary/train.bin`, `test.bin`,
  `fine_label_names.txt`, `coarse_label_names.txt`. A record is the label byte (CIFAR-100:
  the coarse then the fine label byte) and 3,072 pixel bytes: the 1,024 red values of the
  32x32 image row by row, then the green, then the blue (planes, not interleaved pixels).
- Python: `cifar-10-batches-py/data_batch_{1..5}`, `test_batch`, `batches.meta`;
  `cifar-100-python/train`, `test`, `meta`. Each a pickled dict, its "data" a (N, 3072)
  uint8 array of such rows, its labels lists ("labels"; "fine_labels", "coarse_labels"),
  read by `cratemae.data.unpickle`, which runs nothing from the file.

Labels are the files' own numbers, as torchvision's `CIFAR10`/`CIFAR100` give them
(CIFAR-100: the fine labels unless the coarse are asked for); the class names are the
meta file's, in that order. Splits: train and test.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cratemae.data.records import Item, Records, png_bytes
from cratemae.data.unpickle import load_pickle
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["FORMATS", "CifarFormat", "CifarSlice", "cifar_records", "find_cifar", "read_batch"]

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarFormat:
    """One of the four downloads: its files and what a record holds."""

    name: str  # the --layout name
    title: str
    folder: str  # the download's folder name
    splits: dict[str, tuple[str, ...]]  # split -> its files, in torchvision's order
    meta: dict[str, str]  # label kind -> the file (binary) or pickle key naming the classes
    classes: dict[str, int]  # label kind -> number of classes
    binary: bool
    meta_file: str = ""  # Python version: the pickle holding the names

    @property
    def label_bytes(self) -> int:
        return len(self.classes)  # CIFAR-100: coarse byte, then fine byte


_TRAIN10 = tuple(f"data_batch_{i}" for i in range(1, 6))
FORMATS = {f.name: f for f in (
    CifarFormat("cifar10-binary", "CIFAR-10, binary version", "cifar-10-batches-bin",
                {"train": tuple(f"{n}.bin" for n in _TRAIN10), "test": ("test_batch.bin",)},
                {"label": "batches.meta.txt"}, {"label": 10}, binary=True),
    CifarFormat("cifar100-binary", "CIFAR-100, binary version", "cifar-100-binary",
                {"train": ("train.bin",), "test": ("test.bin",)},
                {"coarse": "coarse_label_names.txt", "fine": "fine_label_names.txt"},
                {"coarse": 20, "fine": 100}, binary=True),
    CifarFormat("cifar10-python", "CIFAR-10, Python version", "cifar-10-batches-py",
                {"train": _TRAIN10, "test": ("test_batch",)}, {"label": "label_names"},
                {"label": 10}, binary=False, meta_file="batches.meta"),
    CifarFormat("cifar100-python", "CIFAR-100, Python version", "cifar-100-python",
                {"train": ("train",), "test": ("test",)},
                {"coarse": "coarse_label_names", "fine": "fine_label_names"},
                {"coarse": 20, "fine": 100}, binary=False, meta_file="meta"),
)}
_PICKLE_LABELS = {"label": "labels", "coarse": "coarse_labels", "fine": "fine_labels"}


def _has_files(folder: Path, fmt: CifarFormat) -> bool:
    return all((folder / f).is_file() for f in fmt.splits["test"]) and (
        (folder / next(iter(fmt.meta.values()))).is_file() if fmt.binary
        else (folder / fmt.meta_file).is_file())


def find_cifar(root: Path, name: str | None = None) -> tuple[CifarFormat, Path] | None:
    """(format, folder) when `root` is one of the downloads' folders, or holds it; `name`
    forces the format (then its files must be there)."""
    found = [(fmt, folder) for fmt in (FORMATS.values() if name is None else [FORMATS[name]])
             for folder in (root, root / fmt.folder) if folder.is_dir() and _has_files(folder, fmt)]
    if len(found) > 1:  # a data folder holding several downloads: which one is meant?
        raise BadInputError(f"{root}: holds several CIFAR downloads "
                            f"({', '.join(str(f) for _, f in found)}); give one of them")
    if found:
        return found[0]
    if name is not None:
        fmt = FORMATS[name]
        files = [*fmt.splits["test"], *(fmt.meta.values() if fmt.binary else [fmt.meta_file])]
        raise BadInputError(f"{root}: --layout {name}: holds no {', '.join(files)} "
                            f"(nor a {fmt.folder}/ folder with them)")
    return None


def _label_kind(fmt: CifarFormat, labels: str | None) -> str:
    if len(fmt.classes) == 1:
        if labels not in (None, "fine"):
            raise BadInputError(f"--cifar100-labels {labels}: {fmt.title} has one label set; "
                                "drop the option")
        return "label"
    if labels not in (None, "fine", "coarse"):
        raise BadInputError(f"--cifar100-labels {labels}: must be fine or coarse")
    return labels or "fine"


def class_names(fmt: CifarFormat, folder: Path, kind: str) -> tuple[str, ...]:
    """The names of the classes, label order, from the meta file."""
    n = fmt.classes[kind]
    if fmt.binary:
        path = regular_file(folder / fmt.meta[kind])
        try:
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(f"{path}: unreadable ({type(err).__name__})") from None
        while names and not names[-1]:  # the files end in blank lines
            names.pop()
        if "" in names:  # a blank line among the names: which class has which name?
            raise BadInputError(f"{path}: line {names.index('') + 1} is blank, among the "
                                "class names")
    else:
        path = folder / fmt.meta_file
        meta = load_pickle(path, f"{fmt.title}'s meta file")
        raw = meta.get(fmt.meta[kind]) if isinstance(meta, dict) else None
        names = [s.decode("latin1") if isinstance(s, bytes) else s for s in raw or []]
        if not all(isinstance(s, str) for s in names):
            names = []
    if len(names) != n:
        raise BadInputError(f"{path}: names {len(names)} classes, not {fmt.title}'s {n}")
    twice = sorted({s for s in names if names.count(s) > 1})
    if twice:
        raise BadInputError(f"{path}: names two classes {twice[0]!r}")
    return tuple(names)


def read_batch(fmt: CifarFormat, path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 32, 32, 3) uint8, labels (N,) int64) of one batch file, checked: a
    file that is no whole number of records, or a label out of range, is bad input."""
    pixels, labels = _read_binary(fmt, path, kind) if fmt.binary else _read_python(fmt, path, kind)
    n = fmt.classes[kind]
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        raise BadInputError(f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}, "
                            f"outside 0..{n - 1} ({fmt.title}, {kind} labels)")
    # (N, 3072) = (N, plane, row, column) -> (N, row, column, plane)
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_binary(fmt: CifarFormat, path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = fmt.label_bytes + PIXELS
    try:
        raw = np.frombuffer(regular_file(path).read_bytes(), np.uint8)
    except OSError as err:
        raise BadInputError(f"{path}: unreadable ({err.strerror})") from None
    if raw.size == 0 or raw.size % size:
        raise BadInputError(f"{path}: {raw.size} bytes, not a whole number of {size}-byte "
                            f"records ({fmt.label_bytes} label byte(s) + {PIXELS} pixel bytes):"
                            " truncated or not a CIFAR batch")
    rows = raw.reshape(-1, size)
    column = 1 if kind == "fine" else 0  # CIFAR-100: coarse byte first, then fine
    return rows[:, fmt.label_bytes:], rows[:, column].astype(np.int64)


def _read_python(fmt: CifarFormat, path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path, f"a {fmt.title} batch")
    key = _PICKLE_LABELS[kind]
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(key) if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS and data.shape[0] > 0):
        raise BadInputError(f"{path}: its 'data' is not an (N, {PIXELS}) uint8 array, as a "
                            f"{fmt.title} batch's is")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(y) is int for y in labels)):
        raise BadInputError(f"{path}: its {key!r} is not a list of {len(data)} integers, one "
                            "per row of its 'data'")
    return data, np.asarray(labels, np.int64)


def _split_files(fmt: CifarFormat, folder: Path, split: str) -> list[Path]:
    files = [folder / f for f in fmt.splits[split]]
    absent = [f.name for f in files if not regular_file(f).is_file()]
    if absent:
        raise BadInputError(f"{folder}: {fmt.title} without its {', '.join(absent)}")
    return files


def cifar_records(root: Path, name: str | None = None, labels: str | None = None) -> Records:
    """The train and test splits of a CIFAR download, as items to shard."""
    found = find_cifar(root, name)
    if found is None:
        raise BadInputError(f"{root}: not a CIFAR-10 or CIFAR-100 download")
    fmt, folder = found
    kind = _label_kind(fmt, labels)
    names = class_names(fmt, folder, kind)
    splits = {}
    seen: dict[bytes, Path] = {}  # a batch copied over another: the same images twice
    for split in fmt.splits:
        items: list[Item] = []
        for path in _split_files(fmt, folder, split):
            pixels, ys = read_batch(fmt, path, kind)
            digest = hashlib.blake2b(np.ascontiguousarray(pixels)).digest()
            if digest in seen:
                raise BadInputError(f"{path}: holds the images of {seen[digest].name}; the "
                                    f"batches of {fmt.title} are all different")
            seen[digest] = path
            stem = path.name.removesuffix(".bin")
            items += [Item(f"{stem}/{i:05d}", int(y), functools.partial(_png, pixels, i),
                           f"{path}#{i}") for i, y in enumerate(ys)]
        splits[split] = items
    title = fmt.title + (f", {kind} labels" if len(fmt.classes) > 1 else "")
    return Records(title, splits, names)


def _png(pixels: np.ndarray, i: int) -> tuple[str, bytes]:
    return "png", png_bytes(np.ascontiguousarray(pixels[i]))


# --- read in place ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarSlice:
    """One batch file read in place: its samples as PNG, labelled as its shards are."""

    format: str
    path: str
    kind: str

    def samples(self, lo: int, hi: int | None) -> Iterator[tuple[str, str, bytes, int]]:
        pixels, labels = _cached_batch(self.format, self.path, self.kind)
        stem = Path(self.path).name.removesuffix(".bin")
        for i in range(lo, len(labels) if hi is None else min(hi, len(labels))):
            yield f"{stem}/{i:05d}", *_png(pixels, i), int(labels[i])


@functools.lru_cache(maxsize=2)  # a worker reads its pieces of one file after another
def _cached_batch(name: str, path: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    return read_batch(FORMATS[name], Path(path), kind)


def cifar_pieces(root: Path, split: str, labels: str | None = None
                 ) -> tuple[CifarFormat, list[tuple[str, int, CifarSlice]], tuple[str, ...]]:
    """(format, [(file, samples, slice)], class names) of one split, read in place."""
    found = find_cifar(root)
    if found is None:
        raise BadInputError(f"{root}: not a CIFAR-10 or CIFAR-100 download")
    fmt, folder = found
    kind = _label_kind(fmt, labels)
    names = class_names(fmt, folder, kind)
    if split not in fmt.splits:
        raise BadInputError(f"{root}: {fmt.title} has the splits train and test, not {split}")
    pieces = []
    for path in _split_files(fmt, folder, split):
        _, ys = _cached_batch(fmt.name, str(path), kind)
        pieces.append((str(path), len(ys), CifarSlice(fmt.name, str(path), kind)))
    return fmt, pieces, names
