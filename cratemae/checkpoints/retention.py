"""Which checkpoints to keep: the last few, plus one per N epochs for later evaluation."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cratemae.checkpoints.resolve import ckpt_dir_of, complete_checkpoints, read_latest
from cratemae.fs import fsync_dir

__all__ = ["completed_epoch", "prune_checkpoints"]

log = logging.getLogger(__name__)


def completed_epoch(meta: dict[str, Any]) -> int | None:
    """The zero-based epoch a checkpoint completes, or None if it was saved mid-epoch.

    `save_checkpoint` requires `end_of_epoch`: True when the checkpoint's step is the last
    step of epoch `meta["epoch"]`, so that `epoch + 1` epochs are done.
    """
    if meta.get("end_of_epoch") is True and isinstance(meta.get("epoch"), int):
        return meta["epoch"]
    return None


def prune_checkpoints(
    ckpt_dir: str | os.PathLike[str],
    keep_last: int,
    keep_every_epochs: int | None = None,
    epoch_of: Callable[[dict[str, Any]], int | None] = completed_epoch,
) -> list[Path]:
    """Delete complete checkpoints that no rule keeps; return the deleted paths.

    Kept: the `keep_last` most recently saved, those for which `epoch_of(meta)` is an epoch
    `e` with `(e + 1) % keep_every_epochs == 0` (when set), and always the one `latest`
    names. Incomplete directories are left alone (they may be worth inspecting); `ckpt_dir`
    may also be the run directory. Call on one rank only.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    if keep_every_epochs is not None and keep_every_epochs <= 0:
        raise ValueError(f"keep_every_epochs must be positive, got {keep_every_epochs}")
    ckpt_dir = ckpt_dir_of(Path(ckpt_dir))
    found = complete_checkpoints(ckpt_dir)  # oldest save first
    keep = {p.name for p, _ in found[-keep_last:]} if keep_last else set()
    latest = read_latest(ckpt_dir)
    if latest is not None:
        keep.add(latest)
    if keep_every_epochs is not None:
        for p, meta in found:
            epoch = epoch_of(meta)
            if epoch is not None and (epoch + 1) % keep_every_epochs == 0:
                keep.add(p.name)
    removed = []
    for p, _ in found:
        if p.name in keep:
            continue
        # Rename first so the checkpoint disappears at once; a crash mid-delete then leaves
        # only dot-named debris, which the next save removes.
        doomed = ckpt_dir / f".{p.name}.del-{os.getpid()}"
        os.rename(p, doomed)
        fsync_dir(ckpt_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("pruned checkpoint %s", p)
        removed.append(p)
    return removed
