"""Checkpoint files: safetensors written atomically (through `cratemae.fs`), and read back
validated.

Durability: every file is written to a temporary name, fsynced and renamed into place by
`cratemae.fs`, so a crash never leaves a half-written file under a final name.

Validation: every failure to read a checkpoint file becomes a one-line `BadInputError` that
names the file and what is wrong with it, never a safetensors/OS traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cratemae.errors import BadInputError
from cratemae.fs import atomic_path
from cratemae.guard import regular_file

__all__ = [
    "FORMAT",
    "file_digest",
    "read_header",
    "read_json",
    "read_safetensors",
    "verify_file",
    "write_safetensors",
]

# The value of the `format` metadata key in every file this package writes.
FORMAT = "cratemae"
_CHUNK = 1 << 22


def file_digest(path: Path) -> dict[str, Any]:
    """`{"sha256": hex, "bytes": size}` of a file, read in chunks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically (a temporary name, fsynced and renamed). Tensors
    sharing storage (tied weights, views of one buffer) are cloned first, because
    safetensors refuses to write aliased tensors."""
    seen: set[int] = set()
    ready: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        if t.nbytes:  # empty tensors have no storage worth tracking (ptr may be 0 for all)
            seen.add(t.untyped_storage().data_ptr())
        ready[key] = t
    with atomic_path(path) as tmp:
        try:
            save_file(ready, str(tmp), metadata={"format": FORMAT, **metadata})
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(errno.EIO, f"cannot write ({err})", str(path)) from err


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, or raise BadInputError naming the file."""
    regular_file(path)  # a FIFO would be waited on for ever
    if not path.is_file():
        raise BadInputError(f"{path}: missing (incomplete checkpoint?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def verify_file(path: Path, expected: Any) -> None:
    """Check a file against the `{"sha256", "bytes"}` record meta.json keeps for it."""
    if not isinstance(expected, dict) or not {"sha256", "bytes"} <= expected.keys():
        raise BadInputError(f"{path}: meta.json has no size/hash record for this file")
    regular_file(path)
    if not path.is_file():
        raise BadInputError(f"{path}: missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "size mismatch"
        raise BadInputError(f"{path}: {what} ({size} bytes, meta.json records {expected['bytes']})")
    if file_digest(path)["sha256"] != expected["sha256"]:
        raise BadInputError(f"{path}: SHA-256 mismatch with meta.json (file is corrupt)")


def read_safetensors(
    path: Path, required: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file written by this package: `(tensors, metadata)`.

    `required` lists metadata keys that must be present besides `format`.
    """
    _, metadata = read_header(path, required)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise BadInputError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from exc
    return tensors, metadata


def read_header(
    path: Path, required: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The header of a safetensors file written by this package, no tensor read:
    `(stand-ins, metadata)`, each stand-in a tensor on the `meta` device with the stored
    shape and dtype (it holds no memory). What a loader checks before it builds anything."""
    regular_file(path)
    if not path.is_file():
        raise BadInputError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stand_ins, names = {}, f.keys()
            for key in names:
                part = f.get_slice(key)
                stand_ins[key] = torch.empty(part.get_shape(), device="meta",
                                             dtype=_DTYPES.get(part.get_dtype(), torch.uint8))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise BadInputError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from exc
    if metadata.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a cratemae file (metadata 'format' is missing or wrong)")
    missing = [k for k in required if k not in metadata]
    if missing:
        raise BadInputError(f"{path}: metadata is missing {', '.join(map(repr, missing))}")
    return stand_ins, metadata


# safetensors' dtype names (`get_dtype()`) and torch's.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
