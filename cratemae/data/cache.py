"""The on-disk cache (demo dataset, shard sample counts) and atomic small-file writes.

Several ranks or processes may race to fill the cache, so every write goes to a temporary
name in the same directory and is renamed into place: readers see all of a file or none.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "cache_dir", "fsync_dir"]


def cache_dir() -> Path:
    """`$CRATEMAE_CACHE`, else `~/.cache/cratemae` (not created here)."""
    env = os.environ.get("CRATEMAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cratemae"


def fsync_dir(path: Path) -> None:
    """Persist a rename: without it a crash can forget the new directory entry."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not let a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())
