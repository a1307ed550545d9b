"""The chunk files of an embed in progress, and their assembly into the final file.

A chunk holds the rows of some consecutive batches of one rank, in the order the loader
yielded them: every array of `cratemae.eval.embeddings` (features, layers.I, labels, valid,
keys, key_offsets) plus `positions`, each row's place in the data set. Batches are runs of
consecutive positions, so `assemble` sorts runs, not rows: it streams the chunks into the
final file in data-set order, each position once, holding one piece at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cratemae.errors import BadInputError
from cratemae.eval.embeddings import (
    TensorStream,
    decode_keys,
    encode_keys,
    layer_name,
    write_npy_dir,
    write_safetensors,
)
from cratemae.fs import atomic_path, atomic_write, fsync_dir, temp_path

__all__ = ["assemble", "chunk_name", "complete_prefix", "write_chunk"]

log = logging.getLogger("cratemae")


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.safetensors"


def write_chunk(path: Path, rows: list[dict[str, Any]]) -> None:
    """One chunk file from rows of batches ({"features": (B, d), ..., "positions": (B,),
    "keys": B strings}), atomically: a chunk file that exists is whole."""
    tensors = {k: torch.cat([r[k] for r in rows]).contiguous()
               for k in rows[0] if k != "keys"}
    data, offsets = encode_keys(k for r in rows for k in r["keys"])
    tensors["keys"] = torch.from_numpy(data.copy())
    tensors["key_offsets"] = torch.from_numpy(offsets)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def complete_prefix(where: Path, n_chunks: int) -> int:
    """How many chunks 0, 1, ... are written (each file is whole: written atomically)."""
    k = 0
    while k < n_chunks and (where / chunk_name(k)).is_file():
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


def assemble(out: Path, files: list[Path], layers: tuple[int, ...], fmt: str,
             meta: dict[str, Any], *, num_samples: int) -> dict[str, Any]:
    """The chunk `files` (of every rank) -> `out` ("safetensors" file or "npy" directory),
    streamed, in data-set order; they must hold `num_samples` positions. Returns `meta`
    completed with what the chunks hold (num_samples, dim, labelled, bad_samples), as
    written into the file."""
    pieces, n = _layout(files)
    if n != num_samples:  # a bug, not the input: no file may claim to hold the data
        raise RuntimeError(f"{out}: the chunks hold {n} samples, the data {num_samples}")
    with safe_open(str(files[0]), framework="np") as f:
        dim = int(f.get_slice("features").get_shape()[1])
    labelled, bad = False, 0
    for p in pieces:
        with safe_open(str(p.file), framework="np") as f:
            labelled |= bool((f.get_slice("labels")[p.lo:p.hi] >= 0).any())
            bad += int((~f.get_slice("valid")[p.lo:p.hi]).sum())
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
