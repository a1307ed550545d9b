"""Finding run directories under a folder: the one walk that `cratemae runs` and every
command looking for "the newest run" (`resolve.find_runs`) share.

Links are followed (runs are often linked in from scratch space), a folder reached by
several links is one run, a link loop is walked once, and the walk stops `RUN_DEPTH` folders
down. A run holds no other runs, and its checkpoints/ and best/ are not looked into.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cratemae.rundir import BEST_DIR, CKPT_DIR, RECIPE_FILE

__all__ = ["RUN_DEPTH", "find_run_dirs", "os_reason"]

# How deep runs are looked for: runs/NAME, runs/GROUP/NAME, ...
RUN_DEPTH = 8


def find_run_dirs(root: Path) -> list[tuple[Path, str | None]]:
    """(run directory, None) for each run under `root` (itself included), and (folder,
    reason) for each folder that cannot be looked into (no permission, a link to nothing or
    round a loop). Links are followed (runs are often linked in from scratch); a folder
    reached twice is listed once, under a path without links when there is one."""
    runs: dict[tuple[int, int], Path] = {}
    problems: list[tuple[Path, str | None]] = []
    seen: set[tuple[int, int]] = set()
    stack = [(root, 0)]
    while stack:
        where, depth = stack.pop()
        try:
            key = _identity(where)
        except OSError as err:
            problems.append((where, os_reason(err)))
            continue
        if key in seen:
            if key in runs and _preferred(where, runs[key], root):
                runs[key] = where
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(where), key=lambda e: e.name)
        except OSError as err:
            problems.append((where, os_reason(err)))
            continue
        if any(e.name == RECIPE_FILE for e in entries):  # a run holds no other runs
            runs[key] = where
        elif depth < RUN_DEPTH:
            stack.extend((Path(e.path), depth + 1) for e in reversed(entries)
                         if e.name not in (CKPT_DIR, BEST_DIR) and _is_dir_or_broken_link(e))
    return sorted([*((p, None) for p in runs.values()), *problems])


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(20, "not a directory", str(path))
    return st.st_dev, st.st_ino


def _preferred(path: Path, other: Path, root: Path) -> bool:
    """Whether `path` names a run better than `other`: without links, else the shorter."""
    def rank(p: Path) -> tuple[bool, int, str]:
        return (p.resolve() != root.resolve() / p.relative_to(root), len(p.parts), str(p))
    return rank(path) < rank(other)


def _is_dir_or_broken_link(entry: os.DirEntry[str]) -> bool:
    """A folder (links followed), or a link that leads nowhere: that one may be a run whose
    scratch space was purged, and is reported rather than skipped."""
    try:
        if entry.is_dir():
            return True
        if not entry.is_symlink():
            return False
        os.stat(entry.path)
        return False  # a link to a file
    except OSError:
        return True


def os_reason(err: OSError) -> str:
    """An OSError as a reason a user reads: the file, then what went wrong."""
    where = f"{err.filename}: " if err.filename is not None else ""
    return f"{where}{err.strerror or err}"
