"""The chunk files of an embed in progress, and their assembly into the final file.

A chunk holds the rows of some consecutive batches of one rank, in the order the loader
yielded them: every array of `cratemae.eval.embeddings` (features, layers.I, labels, valid,
keys, key_offsets) plus `positions`, each row's place in the data set. Batches are runs of
consecutive positions, so `assemble` sorts runs, not rows: it streams the chunks into the
final file in data-set order, each position once, holding one piece at a time.

Sizes must be known before the first byte of a safetensors file, so the writer takes
tensors as (name, dtype, shape, a generator of their bytes): the header is written first,
then each tensor's bytes stream in; nothing is held whole in memory.

A chunk file is written atomically, so one that exists was whole when written; one damaged
since (a truncated copy, a bad header, the wrong rows), or one of another embed copied in
(each carries its embed's `record_tag`), is found by `complete_prefix`, which
removes it to be computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cratemae.errors import BadInputError
from cratemae.eval.embeddings import (
    INDEX_FILE,
    KEYS_FILE,
    decode_keys,
    encode_keys,
    layer_name,
)
from cratemae.fs import atomic_path, atomic_write, atomic_write_text, fsync_dir, temp_path
from cratemae.lock import FileLock, LockHeld

__all__ = [
    "PartsLock",
    "TensorStream",
    "assemble",
    "chunk_arrays",
    "chunk_name",
    "chunk_problem",
    "complete_prefix",
    "record_tag",
    "write_chunk",
    "write_npy_dir",
    "write_safetensors",
]

log = logging.getLogger("cratemae")
_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("uint8"): "U8",
              np.dtype("bool"): "BOOL"}


@dataclass(frozen=True)
class TensorStream:
    """One array of the output, described before its bytes are produced."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]  # the array's rows, in order, piece by piece


def _write_stream(f: IO[bytes], t: TensorStream) -> None:
    """Write the pieces of `t`, checking that they add up to its declared size."""
    want = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
    done = 0
    for piece in t.chunks():
        data = np.ascontiguousarray(piece, dtype=t.dtype).tobytes()
        f.write(data)
        done += len(data)
    if done != want:
        raise RuntimeError(f"{t.name}: wrote {done} bytes, expected {want}")


def write_safetensors(f: IO[bytes], tensors: list[TensorStream], metadata: dict[str, str]
                      ) -> None:
    """A safetensors file, header first (its layout: an 8-byte little-endian header length,
    the JSON header padded with spaces to a multiple of 8, then the tensors' bytes back to
    back in the order given)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for t in tensors:
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)) + text)
    for t in tensors:
        _write_stream(f, t)


def write_npy_dir(directory: Path, tensors: list[TensorStream], keys: Iterator[str],
                  index: dict[str, Any]) -> None:
    """`NAME.npy` for each array, `keys.jsonl`, and `index.json` into an (empty) directory,
    each file flushed to the disk (the directory is renamed into place afterwards)."""
    from numpy.lib import format as npy

    for t in tensors:
        with atomic_write(directory / f"{t.name}.npy") as f:
            npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(t.dtype),
                                           "fortran_order": False, "shape": t.shape})
            _write_stream(f, t)
    with atomic_write(directory / KEYS_FILE, "w") as f:
        for key in keys:
            f.write(json.dumps(key, allow_nan=False) + "\n")
    files = {t.name: f"{t.name}.npy" for t in tensors}
    text = json.dumps({**index, "arrays": files, "keys": KEYS_FILE}, indent=1, sort_keys=True,
                      allow_nan=False)
    atomic_write_text(directory / INDEX_FILE, text + "\n")


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.safetensors"


def write_chunk(path: Path, rows: list[dict[str, Any]], tag: str) -> None:
    """One chunk file from rows of batches ({"features": (B, d), ..., "positions": (B,),
    "keys": B strings}), atomically: a chunk file that exists is whole. `tag` (the embed's
    `record_tag`) goes into its metadata: a chunk of another embed is never taken."""
    tensors = {k: torch.cat([r[k] for r in rows]).contiguous()
               for k in rows[0] if k != "keys"}
    data, offsets = encode_keys(k for r in rows for k in r["keys"])
    tensors["keys"] = torch.from_numpy(data.copy())
    tensors["key_offsets"] = torch.from_numpy(offsets)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"embed": tag})


def record_tag(record: dict[str, Any]) -> str:
    """What every chunk of one embed carries: a digest of its settings record (checkpoint
    SHA-256, data, pooling, layers, ...)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, allow_nan=False).encode()).hexdigest()


def chunk_arrays(layers: tuple[int, ...]) -> tuple[str, ...]:
    """The arrays every chunk file of an embed of `layers` holds."""
    return ("features", *[layer_name(i) for i in layers], "labels", "valid", "positions",
            "keys", "key_offsets")


def chunk_problem(path: Path, names: tuple[str, ...], tag: str, rows: int | None = None
                  ) -> str | None:
    """Why the chunk file at `path` cannot be used (unreadable, made by another embed than
    `tag`'s, an array missing, rows that do not agree or are not `rows`), or None."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("embed") != tag:
                return "it was made by another embed (other weights, data or settings)"
            have = set(f.keys())
            missing = [n for n in names if n not in have]
            if missing:
                return f"it holds no array {missing[0]!r}"
            n = f.get_slice("positions").get_shape()[0]
            for name in names:
                if name == "keys":
                    continue
                got = f.get_slice(name).get_shape()[0]
                if got != (n + 1 if name == "key_offsets" else n):
                    return f"its array {name!r} has {got} rows, its positions {n}"
    except (SafetensorError, OSError, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if rows is not None and n != rows:
        return f"it holds {n} rows, its batches {rows}"
    return None


def complete_prefix(where: Path, n_chunks: int, names: tuple[str, ...], tag: str,
                    rows: Callable[[int], int] | None = None, *, remove: bool = False) -> int:
    """How many chunks 0, 1, ... are written and sound (`chunk_problem`; chunk k must hold
    `rows(k)` rows). With `remove`, the first damaged one is removed, to be computed again."""
    k = 0
    while k < n_chunks and (where / chunk_name(k)).is_file():
        path = where / chunk_name(k)
        problem = chunk_problem(path, names, tag, None if rows is None else rows(k))
        if problem is not None:
            if remove:
                log.warning("%s: damaged chunk (%s): computing it again", path, problem)
                path.unlink(missing_ok=True)
            break
        k += 1
    return k


@dataclass(frozen=True)
class _Piece:
    file: Path
    lo: int  # rows lo..hi-1 of the chunk file
    hi: int


def _layout(chunk_files: list[Path]) -> tuple[list[_Piece], int]:
    """The pieces of the chunk files in data-set order, each position once (a short rank's
    repeated last sample is left out), and the number of samples."""
    runs = []
    for file in chunk_files:
        with safe_open(str(file), framework="np") as f:
            pos = f.get_tensor("positions")
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1  # (runs - 1,)
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(pos)], strict=True):
            runs.append((int(pos[a]), file, a, b))
    runs.sort(key=lambda r: (r[0], str(r[1]), r[2]))
    pieces, expected = [], 0
    for first, file, a, b in runs:
        if first > expected:
            raise BadInputError(f"samples {expected}..{first - 1} are in no chunk file")
        skip = expected - first  # already written by an earlier piece
        if b - a > skip:
            pieces.append(_Piece(file, a + skip, b))
            expected = first + (b - a)
    return pieces, expected


def _stream(pieces: list[_Piece], name: str) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        for p in pieces:
            with safe_open(str(p.file), framework="np") as f:
                yield f.get_slice(name)[p.lo:p.hi]
    return chunks


def _key_pieces(pieces: list[_Piece]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(key bytes, offsets from 0) of each piece."""
    for p in pieces:
        with safe_open(str(p.file), framework="np") as f:
            offsets = f.get_tensor("key_offsets")[p.lo:p.hi + 1]
            data = f.get_slice("keys")[int(offsets[0]):int(offsets[-1])]
        yield data, offsets - offsets[0]


def _say_repeated_keys(pieces: list[_Piece]) -> None:
    """Warn when sample keys repeat: a shard copied over another (the same images twice) or
    shards that number their keys alike. Hashes, 8 bytes a sample, not the keys."""
    def keys() -> Iterator[bytes]:
        for data, offsets in _key_pieces(pieces):
            raw = data.tobytes()
            yield from (raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                                 strict=True))

    hashes = np.fromiter((hash(k) for k in keys()), dtype=np.int64)
    unique, first_row, counts = np.unique(hashes, return_index=True, return_counts=True)
    if unique.size < hashes.size:
        row = int(first_row[counts > 1].min())  # the first key, in data-set order, seen again
        key = next(k for i, k in enumerate(keys()) if i == row)
        log.warning("%d of the %d sample keys repeat an earlier one (first %r): the data holds "
                    "those samples more than once, or its shards number their keys alike",
                    hashes.size - unique.size, hashes.size,
                    key.decode("utf-8", "surrogateescape"))


def assemble(out: Path, files: list[Path], layers: tuple[int, ...], fmt: str,
             meta: dict[str, Any], *, num_samples: int) -> dict[str, Any]:
    """The chunk `files` (of every rank) -> `out` ("safetensors" file or "npy" directory),
    streamed, in data-set order; they must hold `num_samples` positions. Returns `meta`
    completed with what the chunks hold (num_samples, dim, labelled, bad_samples), as
    written into the file. A label past `meta["classes"]` is bad input: nothing written."""
    pieces, n = _layout(files)
    if n != num_samples:  # a bug, not the input: no file may claim to hold the data
        raise RuntimeError(f"{out}: the chunks hold {n} samples, the data {num_samples}")
    with safe_open(str(files[0]), framework="np") as f:
        dim = int(f.get_slice("features").get_shape()[1])
    labelled, bad, top = False, 0, -1
    for p in pieces:
        with safe_open(str(p.file), framework="np") as f:
            labels = f.get_slice("labels")[p.lo:p.hi]
            labelled |= bool((labels >= 0).any())
            top = max(top, int(labels.max(initial=-1)))
            bad += int((~f.get_slice("valid")[p.lo:p.hi]).sum())
    classes = meta.get("classes")
    if classes and top >= len(classes):  # a label past the list would name no class
        data = ", ".join(map(str, meta.get("data") or [])) or "the data"
        raise BadInputError(f"{data}: a sample has label {top}, but its class list names "
                            f"{len(classes)} classes (labels 0..{len(classes) - 1}): the "
                            "labels and the class list disagree")
    _say_repeated_keys(pieces)
    names = ["features", *[layer_name(i) for i in layers]]
    tensors = [TensorStream(x, np.dtype("float32"), (n, dim), _stream(pieces, x)) for x in names]
    if labelled:
        tensors.append(TensorStream("labels", np.dtype("int64"), (n,), _stream(pieces, "labels")))
    tensors.append(TensorStream("valid", np.dtype("bool"), (n,), _stream(pieces, "valid")))
    meta = {**meta, "num_samples": n, "dim": dim, "labelled": labelled, "bad_samples": bad}
    if fmt == "npy":
        _write_npy(out, tensors, pieces, meta)
    else:
        key_bytes = sum(int(d.size) for d, _ in _key_pieces(pieces))
        _write_st(out, tensors, pieces, n, key_bytes, meta)
    return meta


def _as_strings(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, allow_nan=False)
            for k, v in meta.items()}


def _write_st(out: Path, tensors: list[TensorStream], pieces: list[_Piece], n: int,
              key_bytes: int, meta: dict[str, Any]) -> None:
    def key_data() -> Iterator[np.ndarray]:
        for data, _ in _key_pieces(pieces):
            yield data

    def key_offsets() -> Iterator[np.ndarray]:
        yield np.zeros(1, dtype=np.int64)
        base = 0
        for _, offsets in _key_pieces(pieces):
            yield offsets[1:] + base
            base += int(offsets[-1])

    tensors = [*tensors,
               TensorStream("keys", np.dtype("uint8"), (key_bytes,), key_data),
               TensorStream("key_offsets", np.dtype("int64"), (n + 1,), key_offsets)]
    if out.is_dir():
        _replace_dir_with(out, None)
    with atomic_write(out) as f:
        write_safetensors(f, tensors, _as_strings(meta))


def _write_npy(out: Path, tensors: list[TensorStream], pieces: list[_Piece],
               meta: dict[str, Any]) -> None:
    def keys() -> Iterator[str]:
        for data, offsets in _key_pieces(pieces):
            yield from decode_keys(data, offsets)

    tmp = temp_path(out)
    tmp.mkdir(parents=True)
    try:
        write_npy_dir(tmp, tensors, keys(), meta)
        _replace_dir_with(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir_with(out: Path, new: Path | None) -> None:
    """Put `new` (a finished directory) at `out`, moving what is there aside first and
    removing it after; `new` None: only remove what is at `out`."""
    old = None
    if out.exists() or out.is_symlink():
        old = temp_path(out)
        os.replace(out, old)
    if new is not None:
        os.replace(new, out)
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


class PartsLock:
    """`with PartsLock(out):` one embed into `out` at a time: the lock
    (`cratemae.lock.FileLock`) on the hidden `.OUT.lock` beside it, held while chunks are
    written to OUT.parts and assembled into OUT, and removed at the end. A second embed is
    refused at once, naming the holder."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.lock = FileLock(self.out.with_name(f".{self.out.name}.lock"), remove=True)

    def __enter__(self) -> PartsLock:
        try:
            self.lock.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock.__enter__()
        except LockHeld as held:
            raise BadInputError(f"--out {self.out}: another embed is writing it "
                                f"({held.holder}); wait for it to end, or give another "
                                "--out") from None
        except OSError as err:
            raise BadInputError(f"--out {self.out}: cannot create its lock {self.lock.path} "
                                f"({err.strerror})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__()
