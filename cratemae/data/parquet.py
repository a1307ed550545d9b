"""Hugging Face data sets as Parquet files (`huggingface-cli download --repo-type dataset`
leaves `plain_text/train-00000-of-00001.parquet`, `data/train-*.parquet`, ...).

- the files: SRC itself (one `.parquet` file) or every `*.parquet` under it (hidden folders,
  such as the download cache's `.cache/`, left out; a FIFO or device named so refused);
  each file's split is its name up to the first `-` or `.` (`train-...`, `validation-...`
  -> val, `test-...`, `train_0`), else its folder's name; `train-00001-of-00004`
  without its 3 other parts is refused (an incomplete download), and so are a split's
  files in several folders (the configs of a repository); a split of another name
  (`train_unlabeled-...`) is refused, not merged into train; a split without rows too;
- the image column: a struct with a `bytes` field (the `Image` feature) or a binary
  column; the label column: an integer column (not pandas' `__index_level_0__`; a
  `label` column of strings or floats is refused). Each found by its type, or named
  (`--image-column`, `--label-column`); a file without an image column is bad input. No
  integer column: unlabelled samples;
- the class names: the `ClassLabel` names of the label column in the data set's
  `dataset_infos.json` or `README.md` front matter (`dataset_info: features:`), when
  present beside the files or above them up to SRC, numbered 0..n-1 and each once; else
  the labels' numbers (`cratemae.data.parquet_names`);
- the reading: one row group at a time (memory bounded by a row group), in an order
  shuffled by row group and within each, so the shards are mixed without reading the data
  set into memory. Labels are the column's values, as `datasets` gives them.

Needs pyarrow, the optional extra `pip install 'cratemae[parquet]'`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cratemae.data.decode import BadSample
from cratemae.data.folders import SPLIT_WORDS
from cratemae.data.parquet_names import class_names
from cratemae.data.records import Item, Records, image_member
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["ParquetSlice", "is_parquet_source", "parquet_pieces", "parquet_records"]

log = logging.getLogger("cratemae.data")

_PREFERRED_LABELS = ("label", "labels", "fine_label")


def _pq(src: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError(f"{src}: reading Parquet files needs pyarrow: pip install "
                            "'cratemae[parquet]' (or pip install pyarrow)") from None
    return pq


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src] if src.suffix == ".parquet" else []
    if not src.is_dir():
        return []
    found = sorted(p for p in src.rglob("*.parquet")
                   if not any(part.startswith(".") for part in p.relative_to(src).parts))
    return [p for p in found if not regular_file(p).is_dir() and p.is_file()]


def is_parquet_source(src: Path) -> bool:
    """Whether `src` is a Parquet file, or a folder holding some at its top or in `data/`,
    or a data set repository's folder (README.md, dataset_infos.json or .gitattributes at
    its top) holding some: a folder of images is not walked through."""
    if src.is_file():
        return src.suffix == ".parquet"
    if not src.is_dir():
        return False
    if any(p.suffix == ".parquet" for d in (src, src / "data") if d.is_dir() for p in d.iterdir()):
        return True
    marked = any(os.path.lexists(src / n) for n in ("README.md", "dataset_infos.json",
                                                     ".gitattributes"))
    return marked and bool(_files(src))


def split_of(path: Path) -> str:
    """The split a file's name begins with (else its folder's name says); bad input when
    neither names one."""
    for name in (path.stem, path.parent.name):
        word = re.split(r"[-.]", name, maxsplit=1)[0].lower()  # Hub files: SPLIT-00000-of-...
        first, _, rest = word.partition("_")
        if word in SPLIT_WORDS or (first in SPLIT_WORDS and rest.isdigit()):
            return SPLIT_WORDS[first]
        if first in SPLIT_WORDS:  # train_unlabeled, validation_matched: another split
            raise BadInputError(f"{path}: its split {word} is none of train, validation, test; "
                                "give the files of one split (a folder or a file)")
    raise BadInputError(f"{path}: its name says no split (train-*, validation-*, test-*), nor "
                        "does its folder's")


@dataclass(frozen=True)
class Columns:
    image: str
    label: str | None


def _columns(pq: Any, path: Path, image: str | None, label: str | None) -> Columns:
    """The image and label columns of one file, by name or by type."""
    import pyarrow as pa

    try:
        schema = pq.ParquetFile(regular_file(path)).schema_arrow
    except Exception as err:  # pyarrow raises many kinds for a file that is not Parquet
        raise BadInputError(f"{path}: not a readable Parquet file ({type(err).__name__}: "
                            f"{err})".replace("\n", " ")) from None
    types = {f.name: f.type for f in schema}

    def is_image(t: Any) -> bool:
        return (pa.types.is_binary(t) or pa.types.is_large_binary(t)) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
            and (pa.types.is_binary(t.field("bytes").type)
                 or pa.types.is_large_binary(t.field("bytes").type)))

    have = ", ".join(f"{n} ({t})" for n, t in types.items())
    images = [n for n, t in types.items() if is_image(t)] if image is None else [image]
    if image is not None and not (image in types and is_image(types[image])):
        raise BadInputError(f"{path}: --image-column {image}: not a struct with bytes or a "
                            f"binary column there; its columns: {have}")
    if not images:
        raise BadInputError(f"{path}: has no image column (a struct with bytes, or binary); "
                            f"its columns: {have}")
    if len(images) > 1:
        raise BadInputError(f"{path}: has several image columns ({', '.join(images)}): name "
                            "one with --image-column")
    ints = [n for n, t in types.items() if pa.types.is_integer(t)
            and not re.fullmatch(r"__index_level_\d+__", n)]  # pandas' index: no labels
    odd = [n for n in _PREFERRED_LABELS if n in types and n not in ints]
    if label is None and odd:  # a label column of strings or floats: not another column
        raise BadInputError(f"{path}: its column {odd[0]} is {types[odd[0]]}, not integer "
                            "labels; name the label column with --label-column")
    if label is not None:
        if label not in ints:
            raise BadInputError(f"{path}: --label-column {label}: not an integer column "
                                f"there; its columns: {have}")
        ints = [label]
    elif len(ints) > 1:
        named = [n for n in _PREFERRED_LABELS if n in ints]
        if not named:
            raise BadInputError(f"{path}: has several integer columns ({', '.join(ints)}): "
                                "name the labels with --label-column")
        ints = named[:1]
    return Columns(images[0], ints[0] if ints else None)


def _labels(pq: Any, path: Path, column: str | None, rows: int) -> np.ndarray:
    """The label column of a file as int64 (-1 for each row when unlabelled)."""
    if column is None:
        return np.full(rows, -1, np.int64)
    col = pq.ParquetFile(path).read(columns=[column]).column(column)
    if col.null_count:
        raise BadInputError(f"{path}: its label column {column} has {col.null_count} empty "
                            "values")
    values = col.to_numpy().astype(np.int64)
    if values.size and values.min() < 0:
        row = int(np.argmin(values))
        raise BadInputError(f"{path}: row {row} has label {int(values[row])}, below 0")
    return values


# --- the samples -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # the items come row group by row group: one in memory
def _row_group(path: str, group: int, column: str) -> tuple[bytes | None, ...]:
    pq = _pq(Path(path))
    col = pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)
    col = col.combine_chunks()
    if hasattr(col, "field"):  # the Image feature: {bytes, path}
        col = col.field("bytes")
    return tuple(col.to_pylist())


def _image(path: str, group: int, column: str, row: int) -> tuple[str, bytes]:
    data = _row_group(path, group, column)[row]
    if not data:
        raise BadSample("no image bytes in its row")
    return image_member(data)


def _key(path: Path, src: Path, row: int) -> str:
    rel = path.relative_to(src) if src.is_dir() else Path(path.name)
    stem = re.sub(r"[^A-Za-z0-9_/-]", "_", str(rel.with_suffix("")))
    return f"{stem}/{row:06d}"


def _all_parts(files: list[Path]) -> None:
    """Bad input when a file named `NAME-00001-of-00004` lacks one of its 4 parts (an
    interrupted download): the split would silently hold a part of its rows."""
    parts: dict[tuple[Path, str], tuple[set[int], set[int]]] = {}
    for f in files:
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)", f.stem)
        if m:
            have, total = parts.setdefault((f.parent, m[1]), (set(), set()))
            have.add(int(m[2]))
            total.add(int(m[3]))
    for (folder, name), (have, total) in sorted(parts.items()):
        n = max(total)
        missing = sorted(set(range(n)) - have)
        if len(total) > 1 or missing or max(have) >= n:
            gone = (f"{name}-{missing[0]:05d}-of-{n:05d}.parquet missing" if missing
                    else "their counts disagree")
            raise BadInputError(f"{folder}: holds {len(have)} files {name}-*-of-*.parquet, not "
                                f"the {n} their names count ({gone}): an incomplete download?")


def _scan(src: Path, image: str | None, label: str | None
          ) -> tuple[Any, list[tuple[Path, str, Columns, np.ndarray, list[int]]]]:
    """(pq, [(file, split, columns, labels, rows per row group)]), every file checked."""
    files = _files(src)
    if not files:
        raise BadInputError(f"{src}: --layout parquet: holds no *.parquet files")
    _all_parts(files)
    pq = _pq(src)
    out = []
    for path in files:
        columns = _columns(pq, path, image, label)
        meta = pq.ParquetFile(path).metadata
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        out.append((path, split_of(path), columns,
                    _labels(pq, path, columns.label, sum(groups)), groups))
    rows: dict[str, int] = {}
    folders: dict[str, set[Path]] = {}
    for path, split, _, _, groups in out:
        rows[split] = rows.get(split, 0) + sum(groups)
        folders.setdefault(split, set()).add(path.parent)
    for split, where in sorted(folders.items()):
        if len(where) > 1:  # a repository's configs (plain_text/, other/): not one split
            raise BadInputError(f"{src}: the {split} files lie in several folders "
                                f"({', '.join(sorted(str(w) for w in where))}), configs of the "
                                "data set? give the folder of one")
    empty = sorted(s for s, n in rows.items() if not n)
    if empty:
        raise BadInputError(f"{src}: its {empty[0]} files hold no rows")
    chosen = {(c.image, c.label) for _, _, c, _, _ in out}
    if len(chosen) > 1:
        raise BadInputError(f"{src}: its files have different image/label columns "
                            f"({'; '.join(f'{i}/{y}' for i, y in sorted(chosen, key=str))}): "
                            "name them with --image-column and --label-column")
    return pq, out


def _classes(src: Path, scanned: list, column: str | None) -> tuple[str, ...] | None:
    """The class names, checked against the labels: a label past them is bad input."""
    if column is None:
        return None
    names = class_names(src, [f for f, *_ in scanned], column)
    twice = sorted({n for n in names or () if names.count(n) > 1})
    if twice:
        raise BadInputError(f"{src}: its metadata names two classes {twice[0]!r}")
    top = max((int(y.max()) for *_, y, _ in scanned if y.size), default=-1)
    if names is not None and top >= len(names):
        where = next(f for f, *_, y, _ in scanned if y.size and int(y.max()) == top)
        raise BadInputError(f"{where}: has label {top}, past the {len(names)} class names of "
                            f"the data set's metadata")
    return names or tuple(str(i) for i in range(top + 1))


def parquet_records(src: Path, image: str | None = None, label: str | None = None,
                    seed: int = 0) -> Records:
    """Every split of the Parquet files of `src`, in the bounded-memory order."""
    _, scanned = _scan(src, image, label)
    column = scanned[0][2].label
    classes = _classes(src, scanned, column)
    pieces: dict[str, list[list[Item]]] = {}
    for path, split, columns, labels, groups in scanned:
        start = 0
        for g, rows in enumerate(groups):
            pieces.setdefault(split, []).append([
                Item(_key(path, src, start + r), int(labels[start + r]),
                     functools.partial(_image, str(path), g, columns.image, r),
                     f"{path} row {start + r}") for r in range(rows)])
            start += rows
    rng = np.random.default_rng(seed)
    splits = {}
    for split, groups in sorted(pieces.items(), key=lambda kv: kv[0] != "train"):
        order = [groups[i] for i in rng.permutation(len(groups))]
        splits[split] = [group[i] for group in order for i in rng.permutation(len(group))]
    kind = "labelled" if column else "unlabelled"
    title = (f"Hugging Face Parquet ({len(scanned)} files; images: {scanned[0][2].image}, "
             f"labels: {column or 'none'}, {kind})")
    return Records(title, splits, classes if column else None, ordered=True)


# --- read in place ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParquetSlice:
    """One row group read in place, labelled by its label column as its shards are."""

    path: str
    group: int
    image: str
    label: str | None
    first_row: int  # the group's first row in its file (the keys count rows of the file)

    def samples(self, lo: int, hi: int | None) -> Iterator[tuple[str, str, bytes, int]]:
        images = _row_group(self.path, self.group, self.image)
        labels = [-1] * len(images)
        if self.label:
            pq = _pq(Path(self.path))
            table = pq.ParquetFile(self.path).read_row_group(self.group, columns=[self.label])
            labels = table.column(self.label).to_pylist()
        stem = Path(self.path).stem
        for r in range(lo, len(images) if hi is None else min(hi, len(images))):
            yield (f"{stem}/{self.first_row + r:06d}", "img", images[r] or b"",
                   int(labels[r]))


def parquet_pieces(src: Path, split: str
                   ) -> tuple[str, list[tuple[str, int, ParquetSlice]], tuple[str, ...] | None]:
    """(title, [(name, rows, slice)] per row group of `split`, class names), read in place;
    data.val reads the val files, else the test files."""
    _, scanned = _scan(src, None, None)
    have = {s for _, s, *_ in scanned}
    want = split if split in have or split != "val" else "test"
    if want not in have:
        raise BadInputError(f"data.{split} = {src}: its Parquet files hold the splits "
                            f"{', '.join(sorted(have))}, not {split}")
    if want != split:
        log.info("data.%s = %s: reading its %s files", split, src, want)
    column = scanned[0][2].label
    pieces = []
    for path, s, columns, _, groups in scanned:
        start = 0
        for g, rows in enumerate(groups):
            if s == want and rows:
                pieces.append((f"{path}#{g}", rows, ParquetSlice(str(path), g, columns.image,
                                                                 columns.label, start)))
            start += rows
    return "Hugging Face Parquet", pieces, _classes(src, scanned, column)
