"""One run per directory: the lock on `RUN_DIR/.lock` (`cratemae.lock.FileLock`) held while a
run writes there. Readers (export, reconstruct, probe's checkpoint, analyze) never take it:
they read complete checkpoints only.
"""

from __future__ import annotations

from pathlib import Path

from cratemae import lock
from cratemae.errors import BadInputError

__all__ = ["LOCK_FILE", "RunLock", "lock_holder"]

LOCK_FILE = ".lock"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of `run_dir` ("host HOST pid PID since ..."), or None when no live
    process does."""
    return lock.lock_holder(Path(run_dir) / LOCK_FILE)


class RunLock:
    """`with RunLock(run_dir):` holds the directory's lock, or raises BadInputError naming
    the holder if another process has it."""

    def __init__(self, run_dir: Path) -> None:
        self.lock = lock.FileLock(Path(run_dir) / LOCK_FILE)

    def __enter__(self) -> RunLock:
        try:
            self.lock.__enter__()
        except lock.LockHeld as held:
            raise BadInputError(
                f"{self.lock.path.parent}: another run is writing into this directory "
                f"({held.holder}); give another --out, or wait for it to end") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__()
