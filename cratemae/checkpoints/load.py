"""Read checkpoints back, all or nothing.

Every file is checked against the size and SHA-256 that meta.json recorded before anything is
parsed, and any problem surfaces as one `BadInputError` naming the file; a `Checkpoint` is only
built once every part has been read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints.files import (
    read_header,
    read_json,
    read_safetensors,
    verify_file,
    write_safetensors,
)
from cratemae.checkpoints.layout import META, MODEL_FILE, TRAIN_FILE
from cratemae.checkpoints.resolve import check_checkpoint_dir, resolve_checkpoint
from cratemae.checkpoints.state_dict import strip_wrapper_prefixes
from cratemae.checkpoints.tree import unflatten_tree
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "read_model_header",
    "read_model_weights",
    "write_model_weights",
]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. The training parts are None when only weights were loaded."""

    path: Path
    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng_states: list[dict[str, torch.Tensor]] | None = None

    @property
    def step(self) -> int | None:
        """The optimizer step the checkpoint was taken after (None for a bare weights file)."""
        return self.meta.get("step")

    @property
    def weights_only(self) -> bool:
        return self.optimizer_state is None


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory, the one a run directory's `latest` names, or (weights only)
    a `model.safetensors` file. Raises BadInputError naming the file and what is wrong."""
    target = resolve_checkpoint(path)
    if target.is_file():
        weights, config, meta = _read_weights_file(target)
        return Checkpoint(path=target, model_state=weights, model_config=config, meta=meta)
    meta = check_checkpoint_dir(target, verify_hashes=True)
    weights, config = _read_model(target / MODEL_FILE)
    train = _read_train_state(target / TRAIN_FILE)
    return Checkpoint(
        path=target,
        model_state=weights,
        model_config=config,
        meta=meta,
        optimizer_state=train["optimizer"],
        scaler_state=train["scaler"],
        rng_states=train["rng"],
    )


def read_model_weights(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(weights, model_config)` from a checkpoint/run directory or a weights file, reading
    only `model.safetensors` (verified against meta.json when there is one). Keys come
    without wrapper prefixes (`module.`, `_orig_mod.`), whatever other tools wrote."""
    target = resolve_checkpoint(path)
    file = target if target.is_file() else target / MODEL_FILE
    weights, config, _ = _read_weights_file(file)
    return strip_wrapper_prefixes(weights), config


def read_model_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(stand-ins, model_config)` as `read_model_weights` gives them, from the file's header
    alone: each stand-in is a tensor on the `meta` device (its shape and dtype, no memory),
    so the configuration can be checked against the shapes before any tensor is read or any
    model is built."""
    target = resolve_checkpoint(path)
    file = target if target.is_file() else target / MODEL_FILE
    stand_ins, metadata = read_header(file, required=("config",))
    return strip_wrapper_prefixes(stand_ins), _config_of(metadata, file)


def write_model_weights(
    path: str | os.PathLike[str], model_state: dict[str, torch.Tensor], model_config: dict[str, Any]
) -> Path:
    """Write a standalone weights file that `read_model_weights`/`load_checkpoint` accept
    (for export). Written atomically, so it is never seen half-written."""
    final = Path(path)
    config = json.dumps(model_config, allow_nan=False)
    write_safetensors(final, model_state, {"kind": "model", "config": config})
    return final


def _read_weights_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Read a model file; inside a checkpoint directory, verify it against meta.json first."""
    meta: dict[str, Any] = {}
    sibling = regular_file(file.parent / META)
    if sibling.is_file():
        meta = read_json(sibling)
        record = meta.get("files")
        if isinstance(record, dict) and file.name in record:
            verify_file(file, record[file.name])
    weights, config = _read_model(file)
    return weights, config, meta


def _read_model(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, metadata = read_safetensors(file, required=("config",))
    return tensors, _config_of(metadata, file)


def _config_of(metadata: dict[str, str], file: Path) -> dict[str, Any]:
    """The model configuration a weights file's metadata records (a JSON object)."""
    if metadata.get("kind", "model") != "model":
        raise BadInputError(f"{file}: holds {metadata['kind']!r}, not model weights")
    try:
        config = json.loads(metadata["config"])
    except (json.JSONDecodeError, RecursionError):  # nested past Python's limit
        raise BadInputError(f"{file}: metadata 'config' is not valid JSON") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{file}: metadata 'config' is not a JSON object")
    return config


def _read_train_state(file: Path) -> dict[str, Any]:
    tensors, metadata = read_safetensors(file, required=("skeleton",))
    try:
        tree = unflatten_tree(tensors, json.loads(metadata["skeleton"]))
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise BadInputError(f"{file}: malformed training state ({exc})") from exc
    ok = (
        isinstance(tree, dict)
        and isinstance(tree.get("optimizer"), dict)
        and isinstance(tree.get("scaler"), dict)
        and isinstance(tree.get("rng"), list)
    )
    if not ok:
        raise BadInputError(f"{file}: training state lacks optimizer/scaler/rng parts")
    return tree
