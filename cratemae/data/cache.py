"""The on-disk cache: the demo data set, shard sample counts, extracted features.

Several ranks or processes may race to fill the cache, so every file in it is written with
`cratemae.fs` (a temporary name in the same directory, renamed into place): readers see all
of a file or none.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """`$CRATEMAE_CACHE`, else `~/.cache/cratemae` (not created here)."""
    env = os.environ.get("CRATEMAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cratemae"
