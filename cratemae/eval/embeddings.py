"""The embeddings file `cratemae embed` writes: its layout, `read_embeddings`, the one
reader, and `read_probe_pair`, the checks of two files a probe fits and scores.

Two formats hold the same arrays, N samples in data-set order:

    features      float32 (N, d)    pooled feature of the last layer (after the final norm)
    layers.I      float32 (N, d)    the same pooling of layer I, one per --layers
    labels        int64 (N,)        class labels (-1: none), when any sample has one
    valid         bool (N,)         False: the image could not be read (its rows are zero)
    keys          the sample keys (file paths of image folders and lists, `__key__` of
                  WebDataset samples)

- safetensors: one file; the keys are `keys` (uint8, UTF-8 bytes back to back) and
  `key_offsets` (int64 (N + 1,): key i is keys[key_offsets[i]:key_offsets[i + 1]]), and the
  description (model, checkpoint SHA-256, pooling, ...) is the header's string metadata.
- npy: a directory of `NAME.npy` arrays, `keys.jsonl` (one JSON string per line) and
  `index.json` (the same description, plus the array files).

Layers are numbered as `--layers` and `probe.layer` number them: 0 is the first encoder
block, depth - 1 (or -1) the last, negative from the end. The metadata's `layer` is the
layer of `features` (always the last, stored as depth - 1) and `layers` the 0-based layers
of the `layers.I` arrays. `pool` is timm's word: "token" (the CLS token) or "avg" (the mean
of the patch tokens). The streaming writer is `cratemae.eval.embed_chunks`'.

Every reader checks what it reads (hostile or damaged files are one `error:` line): each
array has one row per key, the metadata's num_samples and dim say the same, labels are
integers, offsets cut the key bytes in order, and a row marked valid is finite.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cratemae.errors import BadInputError
from cratemae.guard import regular_file

if TYPE_CHECKING:
    from cratemae.eval.features import FeatureSet

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "KEYS_FILE",
    "POOL_ALIASES",
    "decode_keys",
    "encode_keys",
    "layer_name",
    "read_embeddings",
    "read_probe_pair",
    "read_probe_split",
]

log = logging.getLogger("cratemae")

FORMAT = "cratemae-embeddings/1"
INDEX_FILE = "index.json"  # the npy format's description
KEYS_FILE = "keys.jsonl"  # the npy format's keys
# Metadata values that are not plain strings: JSON in the file, decoded by the reader.
_JSON_FIELDS = ("layer", "layers", "img_size", "mean", "std", "num_samples", "dim", "classes",
                "data", "model", "bad_samples", "labelled")
# The older words of `cratemae embed --pool` (deprecated) -> timm's, which files record.
POOL_ALIASES = {"cls": "token", "mean": "avg"}
Readers = dict[str, Callable[[], torch.Tensor]]


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
    """The keys `encode_keys` gave; offsets that do not cut `data` in order are a
    ValueError."""
    if (offsets.ndim != 1 or offsets.dtype.kind not in "iu" or not offsets.size
            or offsets[0] != 0 or offsets[-1] != data.size or (np.diff(offsets) < 0).any()):
        raise ValueError(f"key_offsets (shape {tuple(offsets.shape)}) do not cut the "
                         f"{data.size} key bytes in order")
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8", "surrogateescape")
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


# --- reading ------------------------------------------------------------------------------
def read_embeddings(
    path: str | Path, layer: int | None = None, *, valid_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, list[str], dict[str, Any]]:
    """(features (N, d) float32, labels (N,) int64 or None, keys, metadata) of a file or
    directory `cratemae embed` wrote.

    `layer`: the features of that encoder layer instead of the last one's, numbered as
    `--layers` and `probe.layer` do: 0 the first, -1 the last, negative from the end. The
    last layer is always there (`features`); another layer the file does not hold is a
    `BadInputError`. `valid_only`: leave out the samples whose image could not be read
    (their rows are zero). Labels are None when no sample has one; -1 marks a sample without
    one. The metadata holds `pool` ("token": CLS, "avg": mean of the patch tokens), `layer`
    (of `features`: the last, 0-based), `layers`, `architecture`, `checkpoint_sha256`,
    `img_size`, `classes`, ... (numbers and lists decoded). A file that contradicts itself
    (rows, dtypes, metadata) or holds a non-finite valid row is a `BadInputError`."""
    arrays, keys, meta = _open(path)
    name = _layer_array(path, arrays, meta, layer)
    n = len(keys)
    features = _array(path, arrays, name, n, "f")
    labels = _array(path, arrays, "labels", n, "i") if "labels" in arrays else None
    valid = (_array(path, arrays, "valid", n, "b") if "valid" in arrays
             else torch.ones(n, dtype=torch.bool))
    _check_meta(path, meta, n, features.shape[1])
    finite = torch.isfinite(features).all(dim=1)  # (N,)
    bad = (valid & ~finite).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise BadInputError(f"{path}: array {name!r} holds non-finite values in {bad.numel()} "
                            f"row(s) marked valid, the first of sample {keys[i]!r}; refused")
    if valid_only and not bool(valid.all()):
        keep = valid.nonzero().squeeze(1)
        features = features[keep]
        labels = None if labels is None else labels[keep]
        keys = [keys[i] for i in keep.tolist()]
    return features, labels, keys, meta


def _depth(meta: dict[str, Any]) -> int | None:
    """The encoder's number of layers: the model's depth, else the last layer's index + 1."""
    model = meta.get("model")
    depth = model.get("depth") if isinstance(model, dict) else None
    if not isinstance(depth, int) and isinstance(meta.get("layer"), int):
        depth = meta["layer"] + 1
    return depth if isinstance(depth, int) and depth > 0 else None


def _layer_array(path: str | Path, arrays: Readers, meta: dict[str, Any],
                 layer: int | None) -> str:
    """The array that holds `layer`'s features (None: the last layer's)."""
    if layer is None:
        return "features"
    depth = _depth(meta)
    index = layer % depth if depth and -depth <= layer < depth else layer
    if layer_name(index) in arrays:
        return layer_name(index)
    if depth and index == depth - 1:
        return "features"
    have = ", ".join(str(i) for i in meta.get("layers") or []) or "none"
    raise BadInputError(f"{path}: holds no features of layer {layer} (0 is the first, -1 the "
                        f"last; layers held: {have}, and the last, {meta.get('layer')})")


# dtype kind -> (what it must be, torch dtype it is read as)
_KINDS = {"f": ("floating point", torch.float32), "i": ("integer", torch.int64),
          "b": ("bool", torch.bool)}


def _array(path: str | Path, arrays: Readers, name: str, rows: int, kind: str) -> torch.Tensor:
    """Array `name`, checked: `rows` rows (one per key), 2-D features or a 1-D column, of
    the dtype `kind` wants."""
    try:
        t = arrays[name]()
    except Exception as err:  # safetensors, numpy and the OS each have their own errors
        raise BadInputError(f"{path}: array {name!r} is unreadable ({err})") from None
    dims = 2 if kind == "f" else 1
    want = f"({rows}, d)" if dims == 2 else f"({rows},)"
    if t.dim() != dims or t.shape[0] != rows or (dims == 2 and t.shape[1] == 0):
        raise BadInputError(f"{path}: array {name!r} has shape {tuple(t.shape)}, expected "
                            f"{want}: one row per sample key ({rows} keys)")
    ok = {"f": t.is_floating_point(), "b": t.dtype == torch.bool,
          "i": not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool}
    if not ok[kind]:
        dtype = str(t.dtype).removeprefix("torch.")
        raise BadInputError(f"{path}: array {name!r} has dtype {dtype}, expected "
                            f"{_KINDS[kind][0]}")
    return t.to(_KINDS[kind][1])


def _check_meta(path: str | Path, meta: dict[str, Any], n: int, dim: int) -> None:
    """The metadata's counts must be the arrays'."""
    for key, found in (("num_samples", n), ("dim", dim)):
        said = meta.get(key)
        if said is not None and said != found:
            raise BadInputError(f"{path}: its metadata says {key} = {said!r}, but its arrays "
                                f"hold {found}; the file is damaged or was edited")


def _decode_meta(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise BadInputError(f"{path}: not an embeddings file of cratemae embed (format "
                            f"{found!r}, expected {FORMAT!r})")
    out: dict[str, Any] = dict(raw)
    for key in _JSON_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    if out.get("pool") in POOL_ALIASES:
        out["pool"] = POOL_ALIASES[out["pool"]]
    return out


def _read_safetensors(path: Path) -> tuple[Readers, list[str], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
        meta = _decode_meta(f.metadata() or {}, path)
        names = set(f.keys())
        keys = decode_keys(f.get_tensor("keys").numpy(), f.get_tensor("key_offsets").numpy())
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{path}: unreadable embeddings file ({err})") from None
    return {n: (lambda n=n: f.get_tensor(n)) for n in names}, keys, meta


def _member(path: Path, name: Any) -> Path:
    """A file of an npy directory, named by its index: a plain name, a regular file."""
    if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name in the directory")
    return regular_file(path / name, "embeddings file")


def _read_npy_dir(path: Path) -> tuple[Readers, list[str], dict[str, Any]]:
    try:
        index = json.loads(regular_file(path / INDEX_FILE).read_text(encoding="utf-8"))
        meta = _decode_meta(index, path)
        with open(_member(path, index["keys"]), encoding="utf-8") as f:
            keys = [json.loads(line) for line in f]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{KEYS_FILE} holds something other than strings")
        files = {n: _member(path, name) for n, name in index["arrays"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BadInputError(f"{path}: unreadable embeddings directory ({err})") from None
    return {n: (lambda p=p: torch.from_numpy(np.load(p))) for n, p in files.items()}, keys, meta


def _open(path: str | Path) -> tuple[Readers, list[str], dict[str, Any]]:
    """(tensor readers by name, keys, metadata) of an embeddings file or directory; the
    tensors are read when their reader is called."""
    path = Path(path)
    if path.is_dir():
        return _read_npy_dir(path)
    regular_file(path, "embeddings")
    if path.is_file():
        return _read_safetensors(path)
    raise BadInputError(f"{path}: embeddings not found")


# --- the probe's two files ----------------------------------------------------------------
def read_probe_split(path: str | Path, *, pool: str, layer: int,
                     split: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(features (N, d), labels (N,), metadata) of an embeddings file for the probe's
    `split`: the file's pooling must be the probe's (`probe.pool`), `layer` (0-based,
    negative from the end) must be its last layer or one of its `--layers`, and every
    sample must carry a label that its class names (if any) name."""
    features, labels, _, meta = _probe_split(Path(path), pool, layer, split)
    return features, labels, meta


def _probe_split(path: Path, pool: str, layer: int,
                 split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    meta = _open(path)[2]
    if meta.get("pool") != pool:
        raise BadInputError(f"{path}: features pooled by {meta.get('pool')!r}, but "
                            f"probe.pool = {pool!r} (embed again with --pool {pool}, or set "
                            f"probe.pool)")
    features, labels, keys, meta = read_embeddings(path, layer)
    if labels is None or bool((labels < 0).any()):
        raise BadInputError(f"{path}: the {split} samples must all carry class labels")
    classes = meta.get("classes")
    if classes and labels.numel() and int(labels.max()) >= len(classes):
        raise BadInputError(f"{path}: array 'labels' holds label {int(labels.max())}, but the "
                            f"file names {len(classes)} classes")
    if not labels.numel():
        raise BadInputError(f"{path}: holds no readable {split} sample")
    return features, labels, keys, meta


# What the two files of a probe must agree on: the same weights (so the same model, layers
# and width) and the same images' preprocessing.
_SAME = ("checkpoint_sha256", "architecture", "img_size", "mean", "std")


def read_probe_pair(train: str | Path, val: str | Path, *, pool: str, layer: int
                    ) -> tuple[FeatureSet, FeatureSet, dict[str, Any]]:
    """(train features, val features, the train file's metadata) of the two embeddings files
    a probe fits and scores, checked to belong together: two files, not one twice; each
    pooled by `pool` and holding `layer` (`read_probe_split`); the same checkpoint (its
    SHA-256), architecture, image size and normalisation, feature width and class names.
    Anything else is one `BadInputError` naming the file; so is a VAL file whose samples
    (keys) are all in the TRAIN file, unless the two record different splits (a copy, or the
    same data embedded twice). Other samples the two files share are a warning (a probe
    scored on what it was fitted on)."""
    from cratemae.eval.features import FeatureSet

    train, val = Path(train), Path(val)
    a = _probe_split(train, pool, layer, "train")
    if _same_path(train, val):
        raise BadInputError(f"--features: {train} is given as both TRAIN and VAL; a probe "
                            f"scored on the features it was fitted on measures nothing: embed "
                            f"the val split into a file of its own")
    b = _probe_split(val, pool, layer, "val")
    for key in _SAME:
        if a[3].get(key) is None:
            raise BadInputError(f"{train}: its metadata records no {key}; embed it again")
        if a[3].get(key) != b[3].get(key):
            raise BadInputError(f"--features: {train} and {val} differ in {key} "
                                f"({a[3].get(key)} vs {b[3].get(key)}): embed both splits "
                                f"with the same weights")
    if a[3].get("layer") != b[3].get("layer"):  # the last layer of each: one depth
        raise BadInputError(f"--features: {train} and {val} differ in layer "
                            f"({a[3].get('layer')} vs {b[3].get('layer')}): embed both splits "
                            f"with the same weights")
    if a[0].shape[1] != b[0].shape[1]:
        raise BadInputError(f"--features: {train} holds {a[0].shape[1]}-dimensional features, "
                            f"{val} {b[0].shape[1]}-dimensional")
    _check_classes(train, val, a[3].get("classes"), b[3].get("classes"))
    _check_order(train, val, a[3].get("split"), b[3].get("split"), len(a[2]), len(b[2]))
    shared = len(set(a[2]) & set(b[2]))
    splits = a[3].get("split"), b[3].get("split")
    if shared == len(b[2]) and (None in splits or splits[0] == splits[1]):
        said = (f"both of the {splits[0]} split" if None not in splits else
                "a split not recorded")
        raise BadInputError(f"--features: every sample of {val} is one of {train} ({said}): "
                            f"a probe scored on the features it was fitted on measures "
                            f"nothing: embed the val split into a file of its own")
    if shared:
        log.warning("--features: %d of the %d val samples of %s are also in %s: the probe is "
                    "scored on samples it was fitted on", shared, len(b[2]), val, train)
    return FeatureSet(a[0], a[1], from_cache=True), FeatureSet(b[0], b[1], from_cache=True), a[3]


def _check_order(train: Path, val: Path, split_a: Any, split_b: Any, n_a: int, n_b: int
                 ) -> None:
    """Refuse two files given the other way round, as `embed --split` recorded them (the
    val split as TRAIN, the train split as VAL); warn when only the TRAIN file is the
    smaller."""
    if (split_a, split_b) == ("val", "train"):
        raise BadInputError(f"--features: {train} was embedded from the val split and {val} "
                            "from the train split; the probe is fitted on the first and "
                            "scored on the second: give them as --features TRAIN VAL")
    if n_a < n_b:
        log.warning("--features: the TRAIN file %s holds fewer samples (%d) than the VAL file "
                    "%s (%d): the probe is fitted on the first file and scored on the second "
                    "(--features TRAIN VAL)", train, n_a, val, n_b)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_classes(train: Path, val: Path, a: Any, b: Any) -> None:
    """Label i must mean the same class in both files: refuse class names that differ; warn
    when only one file names its classes."""
    if a and b and list(a) != list(b):
        diff = next((f"label {i} is {x!r} in {train}, {y!r} in {val}"
                     for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    f"{len(a)} classes in {train}, {len(b)} in {val}")
        raise BadInputError(f"--features: the two files name their classes differently: "
                            f"{diff}")
    if bool(a) != bool(b):
        named, numbered = (train, val) if a else (val, train)
        log.warning("--features: %s names its classes but %s has numbered labels only: make "
                    "sure label i means the same class in both, or the scores mean nothing",
                    named, numbered)
