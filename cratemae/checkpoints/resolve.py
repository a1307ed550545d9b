"""Find runs and checkpoints, and decide whether checkpoints are complete: the one resolver
every command uses, whatever the user names (a run, its `checkpoints/`, one checkpoint, a
weights file, an export folder, or nothing: the newest run under `RUNS_DIR`).

A checkpoint directory is *complete* when its `meta.json` parses and the two safetensors files
it records exist with the recorded sizes; it is *verified* when their SHA-256 sums match too.
Scans (resume, pruning) use the cheap check; loading uses the full one, so a checkpoint is
never hashed twice just to be found.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from cratemae.checkpoints.discover import find_run_dirs
from cratemae.checkpoints.files import FORMAT, read_json, verify_file
from cratemae.checkpoints.layout import (
    LATEST,
    META,
    MODEL_FILE,
    TRAIN_FILE,
    step_dirs,
    step_of,
)
from cratemae.errors import BadInputError
from cratemae.guard import regular_file
from cratemae.rundir import RUNS_DIR, RunFiles

__all__ = [
    "MetaFieldError",
    "Resume",
    "check_checkpoint_dir",
    "check_meta_fields",
    "ckpt_dir_of",
    "complete_checkpoints",
    "find_resume",
    "find_runs",
    "newest_complete",
    "read_latest",
    "resolve_checkpoint",
    "run_dir_of",
]

log = logging.getLogger(__name__)



def check_checkpoint_dir(path: Path, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Return the checkpoint's meta.json, or raise BadInputError naming the bad file."""
    if not path.is_dir():
        raise BadInputError(f"{path}: not a checkpoint directory (missing)")
    meta = read_json(path / META)
    if meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise BadInputError(f"{path / META}: not a cratemae checkpoint record")
    check_meta_fields(meta, path / META)
    for name in (MODEL_FILE, TRAIN_FILE):
        expected = meta["files"].get(name)
        if verify_hashes:
            verify_file(path / name, expected)
        else:
            file = path / name
            if not file.is_file() or not isinstance(expected, dict):
                raise BadInputError(f"{file}: missing")
            if file.stat().st_size != expected.get("bytes"):
                raise BadInputError(f"{file}: size differs from meta.json (truncated?)")
    return meta


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The fields the store and the training loop read back, and what each must hold.
_META_FIELDS: dict[str, tuple[Any, str]] = {
    "step": (_count, "a whole number >= 0"),
    "epoch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
              "a whole number >= -1"),
    "samples_seen": (_count, "a whole number >= 0"),
    "bad_samples": (_count, "a whole number >= 0"),
    "nonfinite_skipped": (_count, "a whole number >= 0"),
    "recoveries": (_count, "a whole number >= 0"),
    "lr_factor": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                  and 0 < v <= 1, "a number in (0, 1]"),
    "fp32": (lambda v: isinstance(v, bool), "true or false"),
    "world_size": (lambda v: _count(v) and v >= 1, "a whole number >= 1"),
    "wall_time": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "a number"),
    "end_of_epoch": (lambda v: isinstance(v, bool), "true or false"),
    "recipe_toml": (lambda v: isinstance(v, str), "a string"),
    "data_position": (lambda v: isinstance(v, dict) and all(
                          _count(v[k]) for k in ("epoch", "batch") if k in v),
                      'an object whose "epoch" and "batch" are whole numbers >= 0'),
}
_REQUIRED_FIELDS = ("step", "epoch", "world_size", "wall_time", "data_position")


class MetaFieldError(BadInputError):
    """A checkpoint whose meta.json was edited into nonsense. Unlike an incomplete save
    (skipped when looking for the newest checkpoint), it stops the command: resuming from
    the one before would silently throw work away."""


def check_meta_fields(meta: dict[str, Any], source: Path) -> None:
    """BadInputError naming the first field of a checkpoint's meta.json that is missing or
    holds the wrong kind of value (a file edited by hand must never start a run at a
    negative step, or end in a traceback)."""
    for name, (ok, what) in _META_FIELDS.items():
        if name not in meta:
            if name in _REQUIRED_FIELDS:
                raise MetaFieldError(f"{source}: field {name!r} is missing")
            continue
        if not ok(meta[name]):
            raise MetaFieldError(f"{source}: field {name!r} must be {what}, "
                                f"not {json.dumps(meta[name], allow_nan=True)[:60]}")


def read_latest(ckpt_dir: Path) -> str | None:
    """The directory name in `ckpt_dir/latest`, or None if there is no readable pointer.
    A FIFO, socket or device in its place is refused (BadInputError), never opened."""
    if not (ckpt_dir / LATEST).is_dir():  # a folder of that name reads as no pointer
        regular_file(ckpt_dir / LATEST, "the checkpoint pointer")
    try:
        name = (ckpt_dir / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    # Only a plain child name is acceptable: the pointer must never lead outside the run.
    return name if name and os.sep not in name and name not in (".", "..") else None


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Complete checkpoints in `ckpt_dir` with their meta, oldest save first.

    "Oldest" is by recorded save time, then step: a run resumed from an earlier checkpoint
    saves lower steps after higher ones, and those newer saves are the ones that matter.
    """
    found = []
    for p in step_dirs(ckpt_dir):
        try:
            found.append((p, check_checkpoint_dir(p, verify_hashes=False)))
        except MetaFieldError:
            raise
        except BadInputError as exc:
            log.debug("skipping incomplete checkpoint: %s", exc)
    found.sort(key=lambda pm: (float(pm[1].get("wall_time", 0.0)), int(pm[1].get("step", 0))))
    return found


def newest_complete(ckpt_dir: Path, exclude: str | None = None) -> Path | None:
    """The most recently saved complete checkpoint, other than `exclude`."""
    found = [p for p, _ in complete_checkpoints(ckpt_dir) if p.name != exclude]
    return found[-1] if found else None


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (itself included), once each however many links lead to
    them (`discover.find_run_dirs`); folders that cannot be looked into are left out here
    (`cratemae runs` lists them as unreadable)."""
    return sorted(path for path, problem in find_run_dirs(root) if problem is None)


def run_dir_of(path: str | os.PathLike[str]) -> Path | None:
    """The run directory that `path` (a run, its checkpoints/, a checkpoint, best/, a
    weights file in one of them) belongs to: the nearest of it and its parents that holds a
    recipe.toml or a checkpoints/ folder; None for weights outside any run (an export)."""
    p = Path(path).absolute()
    for where in (p, *p.parents) if p.is_dir() else p.parents:
        files = RunFiles(where)
        if files.is_run() or files.checkpoints.is_dir():
            return where
    return None


def _newest_of_runs(runs_dir: Path, accept: Callable[[Path], bool] | None) -> Path | None:
    """The most recently saved complete checkpoint of any run under `runs_dir` whose weights
    file `accept` takes (all, without it)."""
    best: tuple[float, Path] | None = None
    for run in find_runs(runs_dir) if runs_dir.is_dir() else []:
        found = complete_checkpoints(RunFiles(run).checkpoints)
        if found and (accept is None or accept(found[-1][0] / MODEL_FILE)):
            path, meta = found[-1]
            key = (float(meta.get("wall_time", 0.0)), path)
            best = key if best is None or key[0] > best[0] else best
    return best[1] if best else None


def ckpt_dir_of(path: Path) -> Path:
    """`RUN_DIR/checkpoints` for a run directory; a checkpoints directory itself is kept."""
    if RunFiles(path).checkpoints.is_dir():
        return RunFiles(path).checkpoints
    return path


def _latest_in(ckpt_dir: Path) -> Path | None:
    """Where `latest` points if that is complete, else the newest complete checkpoint (a
    pointer can only be stale if someone edited the directory by hand)."""
    name = read_latest(ckpt_dir)
    if name is not None:
        try:
            check_checkpoint_dir(ckpt_dir / name, verify_hashes=False)
            return ckpt_dir / name
        except MetaFieldError:
            raise
        except BadInputError as exc:
            log.warning("%s does not name a complete checkpoint (%s); scanning", LATEST, exc)
    return newest_complete(ckpt_dir)


def resolve_checkpoint(path: str | os.PathLike[str] | None, *, runs_dir: Path = RUNS_DIR,
                       accept: Callable[[Path], bool] | None = None,
                       wanted: str = "run") -> Path:
    """Turn a user-given path into a checkpoint directory or a `.safetensors` weights file.

    Accepts a checkpoint directory, a run directory or its `checkpoints/` (then the checkpoint
    `latest` names), an export folder or a safetensors file. None: the newest checkpoint of
    the runs under `runs_dir` whose weights `accept` takes (`wanted` names them in the error
    when there is none).
    """
    if path is None:
        found = _newest_of_runs(runs_dir, accept)
        if found is None:
            where = runs_dir if runs_dir.is_absolute() else f"./{runs_dir}"
            raise BadInputError(f"no --checkpoint given and no {wanted} under {where}: "
                                f"pass --checkpoint CKPT")
        return found
    p = Path(path)
    if p.is_file():
        if p.name == META:
            return p.parent
        if p.name == LATEST and p.parent.name == RunFiles(p.parent.parent).checkpoints.name:
            # the pointer file itself: the checkpoint it names, never its text read as weights
            found = _latest_in(p.parent)
            if found is None:
                raise BadInputError(f"{p.parent}: no complete checkpoint in this directory")
            return found
        return p
    if not p.exists():
        raise BadInputError(f"{p}: no such checkpoint file or directory")
    if step_of(p.name) is not None or (p / META).exists() or (p / MODEL_FILE).exists():
        return p
    ckpt_dir = ckpt_dir_of(p)
    if (ckpt_dir / LATEST).exists() or step_dirs(ckpt_dir):
        found = _latest_in(ckpt_dir)
        if found is None:
            raise BadInputError(f"{ckpt_dir}: no complete checkpoint in this directory")
        return found
    raise BadInputError(f"{p}: not a checkpoint, a run directory or a safetensors file")


@dataclass(frozen=True)
class Resume:
    """Where a run continues from, parsed once from `--resume` (or a library caller).

    "auto": the newest complete checkpoint in the run directory, if there is one; "never":
    a fresh run, refused if the directory already holds checkpoints (a new run would mix
    into them); anything else: the path of a checkpoint or run directory.
    """

    mode: Literal["auto", "never", "path"]
    path: Path | None = None
    AUTO: ClassVar[Resume]

    @classmethod
    def parse(cls, value: str | os.PathLike[str]) -> Resume:
        """The value of `--resume`; BadInputError for a path that does not exist."""
        if value in ("auto", "never"):
            return cls(value)  # type: ignore[arg-type]
        path = Path(value)
        if not path.exists():
            raise BadInputError(
                f"--resume {value}: no such checkpoint (expected auto, never or a path)")
        return cls("path", path)


Resume.AUTO = Resume("auto")


def find_resume(run_dir: str | os.PathLike[str], resume: Resume) -> Path | None:
    """The checkpoint a run in `run_dir` should resume from (see `Resume`), or None.

    A path must hold a complete checkpoint, else BadInputError; so must a run directory
    whose checkpoints are all damaged, unless a path is given: it is not started over.
    """
    ckpt_dir = RunFiles(run_dir).checkpoints
    latest = _latest_in(ckpt_dir) if ckpt_dir.is_dir() else None
    steps = step_dirs(ckpt_dir)
    if latest is None and steps and resume.mode != "path":  # a run, none of it loadable
        try:
            check_checkpoint_dir(steps[-1], verify_hashes=False)
            why = "incomplete"
        except BadInputError as exc:
            why = str(exc)
        raise BadInputError(
            f"{run_dir}: holds {len(steps)} checkpoint(s), none complete ({why}); starting "
            f"over would replace its run: give a new --out, resume from a good copy with "
            f"--resume PATH, or remove {ckpt_dir} first")
    if resume.mode == "never":
        if latest is not None:
            raise BadInputError(
                f"{run_dir} already holds checkpoints and --resume never would mix a new run "
                f"into them: give a new --out, or remove the directory first")
        return None
    if resume.mode == "auto":
        return latest
    assert resume.path is not None
    found = resolve_checkpoint(resume.path)
    if found.is_file():
        raise BadInputError(f"{found}: a weights file cannot be resumed from; give a checkpoint")
    check_checkpoint_dir(found, verify_hashes=False)
    return found
