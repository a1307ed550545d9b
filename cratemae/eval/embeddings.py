"""The embeddings file `cratemae embed` writes: its layout, the streaming writer that
assembles it from chunks, and `read_embeddings`, the one reader.

Two formats hold the same arrays, N samples in data-set order:

    features      float32 (N, d)    pooled feature of the last layer (after the final norm)
    layers.I      float32 (N, d)    the same pooling of layer I (0-based), one per --layers
    labels        int64 (N,)        class labels (-1: none), when any sample has one
    valid         bool (N,)         False: the image could not be read (its rows are zero)
    keys          the sample keys (file paths of image folders and lists, `__key__` of
                  WebDataset samples)

- safetensors: one file; the keys are `keys` (uint8, UTF-8 bytes back to back) and
  `key_offsets` (int64 (N + 1,): key i is keys[key_offsets[i]:key_offsets[i + 1]]), and the
  description (model, checkpoint SHA-256, pooling, ...) is the header's string metadata.
- npy: a directory of `NAME.npy` arrays, `keys.jsonl` (one JSON string per line) and
  `index.json` (the same description, plus the array files).

Sizes must be known before the first byte of a safetensors file, so the writer takes
tensors as (name, dtype, shape, a generator of their bytes): the header is written first,
then each tensor's bytes stream in; nothing is held whole in memory.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from cratemae.errors import BadInputError
from cratemae.fs import atomic_write, atomic_write_text

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "KEYS_FILE",
    "TensorStream",
    "decode_keys",
    "encode_keys",
    "layer_name",
    "read_embeddings",
    "read_probe_split",
    "write_npy_dir",
    "write_safetensors",
]

log = logging.getLogger("cratemae")

FORMAT = "cratemae-embeddings/1"
INDEX_FILE = "index.json"  # the npy format's description
KEYS_FILE = "keys.jsonl"  # the npy format's keys
# Metadata values that are not plain strings: JSON in the file, decoded by the reader.
_JSON_FIELDS = ("layer", "layers", "img_size", "mean", "std", "num_samples", "dim", "classes",
                "data", "model", "bad_samples", "labelled")
_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("uint8"): "U8",
              np.dtype("bool"): "BOOL"}


def layer_name(layer: int) -> str:
    """The array of one layer's features: `layers.4`."""
    return f"layers.{layer}"


def encode_keys(keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys -> (uint8 bytes back to back, int64 offsets (n + 1,)). A file name that is not
    UTF-8 keeps its own bytes (surrogateescape)."""
    blobs = [k.encode("utf-8", "surrogateescape") for k in keys]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def decode_keys(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8", "surrogateescape")
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


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


# --- reading ------------------------------------------------------------------------------
def read_embeddings(
    path: str | Path, layer: int | None = None, *, valid_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, list[str], dict[str, Any]]:
    """(features (N, d) float32, labels (N,) int64 or None, keys, metadata) of a file or
    directory `cratemae embed` wrote.

    `layer`: the features of that layer (as `--layers` named it, negative from the end)
    instead of the last layer's; a layer the file does not hold is a `BadInputError`.
    `valid_only`: leave out the samples whose image could not be read (their rows are zero).
    Labels are None when no sample has one; -1 marks a sample without one. The metadata
    holds `pool` ("token": CLS, "avg": mean of the patch tokens), `layer`, `layers`,
    `architecture`, `checkpoint_sha256`, `img_size`, `classes`, ... (numbers and lists
    decoded)."""
    arrays, keys, meta = _open(path)
    name = "features"
    if layer is not None:
        depth = int(meta.get("model", {}).get("depth", 0)) or None
        index = layer % depth if depth and -depth <= layer < depth else layer
        name = layer_name(index)
        if name not in arrays:
            have = ", ".join(str(i) for i in meta.get("layers", [])) or "none"
            raise BadInputError(f"{path}: holds no features of layer {layer} (layers held: "
                                f"{have}; the main features are of layer {meta.get('layer')})")
    features = arrays[name]()
    labels = arrays["labels"]() if "labels" in arrays else None
    if valid_only:
        valid = arrays["valid"]()
        if not bool(valid.all()):
            keep = valid.nonzero().squeeze(1)
            features = features[keep]
            labels = None if labels is None else labels[keep]
            keys = [keys[i] for i in keep.tolist()]
    return features, labels, keys, meta


def _decode_meta(raw: dict[str, str], path: Path) -> dict[str, Any]:
    if raw.get("format") != FORMAT:
        raise BadInputError(f"{path}: not an embeddings file of cratemae embed (format "
                            f"{raw.get('format')!r}, expected {FORMAT!r})")
    out: dict[str, Any] = dict(raw)
    for key in _JSON_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str],
                                           dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
        meta = _decode_meta(f.metadata() or {}, path)
        names = set(f.keys())
        keys = decode_keys(f.get_tensor("keys").numpy(), f.get_tensor("key_offsets").numpy())
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise BadInputError(f"{path}: unreadable embeddings file ({err})") from None
    return {n: (lambda n=n: f.get_tensor(n)) for n in names}, keys, meta


def _read_npy_dir(path: Path) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str],
                                       dict[str, Any]]:
    try:
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        meta = _decode_meta(index, path)
        with open(path / index["keys"], encoding="utf-8") as f:
            keys = [json.loads(line) for line in f]
        files = {n: path / name for n, name in index["arrays"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{path}: unreadable embeddings directory ({err})") from None
    return {n: (lambda p=p: torch.from_numpy(np.load(p))) for n, p in files.items()}, keys, meta


def read_probe_split(path: str | Path, *, pool: str, layer: int,
                     split: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(features (N, d), labels (N,), metadata) of an embeddings file for the probe's
    `split`: the file's pooling must be the probe's (`probe.pool`), `layer` must be its main
    layer or one of its `--layers`, and every sample must carry a label."""
    meta = _open(path)[2]
    if meta.get("pool") != pool:
        raise BadInputError(f"{path}: features pooled by {meta.get('pool')!r}, but "
                            f"probe.pool = {pool!r} (embed again with --pool, or set "
                            f"probe.pool)")
    depth = int(meta.get("model", {}).get("depth", 0))
    main = depth and layer % depth == int(meta.get("layer", -1)) % depth
    features, labels, _, meta = read_embeddings(path, None if main else layer)
    if labels is None or bool((labels < 0).any()):
        raise BadInputError(f"{path}: the {split} samples must all carry class labels")
    return features, labels, meta


def _open(path: str | Path) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str],
                                     dict[str, Any]]:
    """(tensor readers by name, keys, metadata) of an embeddings file or directory; the
    tensors are read when their reader is called."""
    path = Path(path)
    if path.is_dir():
        return _read_npy_dir(path)
    if path.is_file():
        return _read_safetensors(path)
    raise BadInputError(f"{path}: embeddings not found")
