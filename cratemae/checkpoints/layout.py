"""Names and places: where a run's checkpoints live and how their directories are called.

RUN_DIR/checkpoints/step-000000123/{model.safetensors, train_state.safetensors, meta.json}
RUN_DIR/checkpoints/latest                 text: "step-000000123"
RUN_DIR/checkpoints/.step-000000124.tmp-PID  a save in progress (or left by a crash)
"""

from __future__ import annotations

import re
from pathlib import Path

from cratemae.rundir import MODEL_FILE

__all__ = [
    "EMA_PREFIX",
    "LATEST",
    "META",
    "MODEL_FILE",
    "TRAIN_FILE",
    "is_temporary",
    "step_dir_name",
    "step_dirs",
    "step_of",
    "temporary_owner",
]

LATEST = "latest"
TRAIN_FILE = "train_state.safetensors"
META = "meta.json"
# A weight average is saved beside the model, its keys under this prefix.
EMA_PREFIX = "ema."

_STEP_RE = re.compile(r"^step-(\d{9,})$")
# Temporary names start with a dot so that nothing scanning for `step-*` ever picks them up.
_TMP_RE = re.compile(
    r"^\.(step-\d+\.(tmp|old|del)-(?P<pid>\d+)|latest\.tmp-(?P<lpid>\d+)(-[0-9a-f]{8})?)$")


def step_dir_name(step: int) -> str:
    """`step-000000123`: zero-padded so that names sort like steps."""
    return f"step-{step:09d}"


def step_of(name: str) -> int | None:
    """The step in a checkpoint directory name, or None if it is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_temporary(name: str) -> bool:
    """Whether a name in the checkpoints directory is debris of an unfinished save/prune."""
    return _TMP_RE.match(name) is not None


def temporary_owner(name: str) -> int | None:
    """The process id that a temporary name records (the process that made it)."""
    m = _TMP_RE.match(name)
    if m is None:
        return None
    return int(m.group("pid") or m.group("lpid"))


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories (complete or not) in `ckpt_dir`, oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p.name), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]
