"""Write a checkpoint so that a crash or `kill -9` at any moment leaves the previous one usable.

The sequence: write every file into `.step-N.tmp-PID/` (each through `cratemae.fs`: a
temporary name, fsynced, renamed), write `meta.json` last (its presence marks the directory
complete, and it records each file's size and SHA-256), fsync the directory, rename it to
`step-N/`, fsync the parent, and only then repoint `latest` with an atomic `os.replace`. A
reader therefore sees either no `step-N/` or a complete one, and `latest` always names a
complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints.files import FORMAT, file_digest, write_safetensors
from cratemae.checkpoints.layout import (
    LATEST,
    META,
    MODEL_FILE,
    TRAIN_FILE,
    is_temporary,
    step_dir_name,
    temporary_owner,
)
from cratemae.checkpoints.resolve import newest_complete, read_latest
from cratemae.checkpoints.tree import flatten_tree
from cratemae.fs import atomic_write_json, atomic_write_text, fsync_dir, pid_alive
from cratemae.rundir import RunFiles

__all__ = ["FORMAT_VERSION", "REQUIRED_META", "RESERVED_META", "save_checkpoint"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# What the caller must say about the run's position; `end_of_epoch` is True when `step` is the
# last step of (zero-based) epoch `epoch`, i.e. `epoch + 1` epochs are complete.
REQUIRED_META = (
    "epoch",
    "samples_seen",
    "data_position",
    "recipe_hash",
    "recipe_toml",
    "end_of_epoch",
)
# What the store itself records; the caller may not set these (`step` only to the same value,
# so a caller's counters dict, which naturally holds the step, can be passed as is).
RESERVED_META = ("format", "format_version", "wall_time", "saved_at", "world_size", "files")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    optimizer_state: dict[str, Any],
    scaler_state: dict[str, Any],
    rng_states: list[dict[str, torch.Tensor]],
    meta: dict[str, Any],
) -> Path:
    """Write `RUN_DIR/checkpoints/step-{step:09d}/` atomically, point `latest` at it, and
    return its path. `rng_states` holds one `collect_rng_state()` dict per rank (its length is
    recorded as the world size). Call it on one rank only.

    Raises ValueError/TypeError for arguments that cannot be stored (nothing is written then).
    """
    record = _meta_record(step, meta, rng_states)
    config_json = _to_json(model_config, "model_config")
    train_tensors, skeleton = flatten_tree(
        {"optimizer": optimizer_state, "scaler": scaler_state, "rng": list(rng_states)}
    )
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}]: expected str -> Tensor")

    ckpt_dir = RunFiles(run_dir).checkpoints
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_debris(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        write_safetensors(tmp / MODEL_FILE, model_state, {"kind": "model", "config": config_json})
        write_safetensors(
            tmp / TRAIN_FILE,
            train_tensors,
            {"kind": "train_state", "skeleton": json.dumps(skeleton, allow_nan=False)},
        )
        record["files"] = {name: file_digest(tmp / name) for name in (MODEL_FILE, TRAIN_FILE)}
        atomic_write_json(tmp / META, record, indent=2)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, final)
    atomic_write_text(ckpt_dir / LATEST, final.name + "\n")
    return final


def remove_debris(ckpt_dir: Path) -> None:
    """Delete what unfinished saves and prunes left behind (dot-named temporaries), but only
    this process's and those of processes that are gone: a live process's save in progress
    is never touched, whoever it is."""
    for p in ckpt_dir.iterdir():
        owner = temporary_owner(p.name)
        if owner is None or (owner != os.getpid() and pid_alive(owner)):
            continue
        if is_temporary(p.name):
            log.info("removing stale temporary %s", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place, replacing an older save of the
    same step (a run resumed from an earlier checkpoint reaches that step again)."""
    ckpt_dir = final.parent
    if final.exists():
        # `latest` must not name a directory that is briefly out of place: point it at the
        # newest other complete checkpoint first (or drop it if there is none).
        if read_latest(ckpt_dir) == final.name:
            other = newest_complete(ckpt_dir, exclude=final.name)
            if other is not None:
                atomic_write_text(ckpt_dir / LATEST, other.name + "\n")
            else:
                (ckpt_dir / LATEST).unlink(missing_ok=True)
        old = ckpt_dir / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)


def _meta_record(step: int, meta: dict[str, Any], rng_states: list[Any]) -> dict[str, Any]:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta is missing {', '.join(missing)}")
    clash = [k for k in RESERVED_META if k in meta]
    if "step" in meta and meta["step"] != step:
        clash.append(f"step (to {meta['step']!r}; the step argument is {step})")
    if clash:
        raise ValueError(f"checkpoint meta may not set {', '.join(clash)} (the store records it)")
    if not isinstance(meta["end_of_epoch"], bool):
        raise ValueError("checkpoint meta 'end_of_epoch' must be a bool")
    if not isinstance(rng_states, (list, tuple)) or not rng_states:
        raise ValueError("rng_states must be a non-empty list (one collect_rng_state() per rank)")
    _to_json(meta, "meta")
    now = time.time()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        **meta,
        "wall_time": now,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "world_size": len(rng_states),
    }


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc
