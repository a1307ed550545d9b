"""One run per directory: an advisory lock on `RUN_DIR/.lock` held while a run writes there.

`flock` locks belong to an open file, so the operating system releases them when the process
ends, however it ends: a crash or `kill -9` never leaves a stale lock. The file records who
holds it (host, pid, since when) for the message a second run gets. Readers (export,
reconstruct, probe's checkpoint, analyze) never take it: they read complete checkpoints only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from pathlib import Path

from cratemae.errors import BadInputError

__all__ = ["LOCK_FILE", "RunLock", "lock_holder"]

LOCK_FILE = ".lock"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of `run_dir` ("host HOST pid PID since ..."), or None when no live
    process does."""
    path = Path(run_dir) / LOCK_FILE
    try:  # NONBLOCK: a FIFO in its place is not waited on (and holds no lock)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """`with RunLock(run_dir):` holds the directory's lock, or raises BadInputError naming
    the holder if another process has it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise BadInputError(
                f"{self.path.parent}: another run is writing into this directory "
                f"({holder or 'holder unknown'}); give another --out, or wait for it to "
                f"end") from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}\n"
                  .encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            # The file stays: removing it would let a third process lock a new inode while
            # a second still waits on the old one.
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
