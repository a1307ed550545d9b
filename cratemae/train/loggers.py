"""Where the curves of a run go besides metrics.jsonl: TensorBoard and Weights & Biases.

The trainer hands `Loggers.write` the very records it appends to metrics.jsonl, so every
logger shows the same numbers. Names: a training line (`"kind": "train"`, or no kind, as
in older files) gives `train/loss`, `train/lr`, `train/images_per_s` and
`train/data_wait_fraction`; an evaluation line (`"kind": "eval"`) gives `val/<name>` for
each number (`val_loss` -> `val/loss`, `val_knn_top1` -> `val/knn_top1`, fine-tuning's
`top1` -> `val/top1`), `layers/<name>/<depth>` for each per-layer list (`coding_rate`,
`sparsity`), and its `samples` picture as the image `val/reconstructions`; a recovery from
non-finite losses (`"kind": "recovery"`, `cratemae.train.recovery`) gives
`recovery/lr_factor` and `recovery/number` at the step the run went back to.

A resumed run drops what was logged after its checkpoint (TensorBoard's `purge_step`, as
metrics.jsonl drops those lines), so the curves continue without a repeated step; a rollback
does the same (`rewind`). W&B cannot take a step back: there the steps repeated after a
rollback are dropped by W&B until the run passes the step it rolled back from.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_text
from cratemae.rundir import RunFiles

__all__ = ["IMAGE_TAG", "LOGGER_NAMES", "Loggers", "scalars"]

log = logging.getLogger("cratemae")

LOGGER_NAMES = ("tensorboard", "wandb")
IMAGE_TAG = "val/reconstructions"
TRAIN_SCALARS = ("loss", "lr", "images_per_s", "data_wait_fraction")
RECOVERY_SCALARS = {"lr_factor": "lr_factor", "recovery": "number"}
LAYER_LISTS = ("coding_rate", "sparsity")
_NOT_CURVES = {"kind", "step", "epoch", "total_steps", "best", "eval_images", "eval_seconds"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The curves one metrics record adds to: {name: value} (see the module docstring)."""
    kind = record.get("kind", "train")
    if kind == "train":
        return {f"train/{k}": float(record[k]) for k in TRAIN_SCALARS if _number(record.get(k))}
    if kind == "recovery":
        return {f"recovery/{name}": float(record[k]) for k, name in RECOVERY_SCALARS.items()
                if _number(record.get(k))}
    if kind != "eval":
        return {}  # a kind this version does not know: no curve
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_CURVES:
            continue
        if key in LAYER_LISTS and isinstance(value, list):
            out.update({f"layers/{key}/{i}": float(v) for i, v in enumerate(value)})
        elif _number(value):
            out[f"val/{key.removeprefix('val_')}"] = float(value)
    return out


class Loggers:
    """The loggers a recipe names (`run.loggers`), opened on rank 0 for one run directory.

    `resume_step`: the step of the checkpoint the run resumes from (None: a new run)."""

    def __init__(self, run_dir: Path, names: Sequence[str], *, resume_step: int | None,
                 config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self._tb: Any = None
        self._wandb: Any = None
        for name in dict.fromkeys(names):  # each once, in order
            if name == "tensorboard":
                self._tb = _tensorboard(RunFiles(run_dir).tensorboard, resume_step)
            elif name == "wandb":
                self._wandb = _wandb(run_dir, config)
            else:
                raise BadInputError(f"run.loggers: unknown logger {name!r} "
                                    f"(known: {', '.join(LOGGER_NAMES)})")

    def write(self, record: dict[str, Any]) -> None:
        """Log one metrics record at its step."""
        if self._tb is None and self._wandb is None:
            return
        step, values = int(record["step"]), scalars(record)
        picture = self.run_dir / record["samples"] if record.get("samples") else None
        if picture is not None and not picture.is_file():
            picture = None
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            if picture is not None:
                self._tb.add_image(IMAGE_TAG, _read_rgb(picture), step, dataformats="HWC")
            if record.get("kind") == "eval":
                self._tb.flush()  # evaluations are rare: show them at once
        if self._wandb is not None:
            import wandb

            data: dict[str, Any] = dict(values)
            if picture is not None:
                data[IMAGE_TAG] = wandb.Image(str(picture))
            self._wandb.log(data, step=step)

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: TensorBoard drops what was logged after it, as on
        resume (the writer is reopened with that `purge_step`)."""
        if self._tb is not None:
            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = _tensorboard(Path(log_dir), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _read_rgb(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("run.loggers: 'tensorboard' needs the tensorboard package "
                            "(pip install tensorboard), or set run.loggers = []") from None
    # Events after the checkpoint, written before an interruption, are dropped by readers.
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge)


def _wandb(run_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run that a resumed run continues: its id is kept in RUN_DIR/wandb-id.txt.
    WANDB_MODE=offline keeps it on disk (RUN_DIR/wandb/); WANDB_PROJECT names the project."""
    try:
        import wandb
    except ImportError:
        raise BadInputError("run.loggers: 'wandb' needs the wandb package "
                            "(pip install 'cratemae[wandb]'), or remove it from run.loggers"
                            ) from None
    id_file = run_dir / "wandb-id.txt"
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
    if not run_id:
        run_id = _run_id()
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "cratemae"), name=run_dir.name,
                      id=run_id, resume="allow", dir=str(run_dir), config=config)


def _run_id() -> str:
    """A new W&B run id: 8 characters of [a-z0-9], as W&B makes them (its own helper has
    moved between releases: `wandb.util.generate_id` is gone in 0.31)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
