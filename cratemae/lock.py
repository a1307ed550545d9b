"""One writer at a time: the advisory lock that runs (`train.lock.RunLock`, on `RUN_DIR/.lock`)
and embeds (`eval.embed_chunks.PartsLock`, beside their output) hold while they write.

`flock` locks belong to an open file, so the operating system releases them when the process
ends, however it ends: a crash or `kill -9` never leaves a stale lock. The file records who
holds it (host, pid, since when) for the message a second writer gets.

Like `cratemae.fs` it sits at the bottom of the package and imports nothing of cratemae, so
every package may use it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from pathlib import Path

__all__ = ["FileLock", "LockHeld", "lock_holder"]


class LockHeld(Exception):
    """Another process holds the lock; `holder` says who ("host H pid P since ...")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who holds the lock file at `path`, or None when no live process does (no file, a
    FIFO or other special file in its place, or a lock nobody holds)."""
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
            return _stamp_of(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class FileLock:
    """`with FileLock(path):` holds an exclusive `flock` on `path` (created if missing), or
    raises `LockHeld` at once, never waiting. `OSError` when the file cannot be created.

    `remove`: the file goes when the lock is released (an embed's lock, beside its output).
    A writer that opened the file just before its last holder removed it opens it again.
    Without it the file stays, emptied (a run directory's lock): removing it there would let
    a third process lock a new file while a second still holds the old one open."""

    def __init__(self, path: str | os.PathLike[str], *, remove: bool = False) -> None:
        self.path, self.remove = Path(path), remove
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _stamp_of(fd)
                os.close(fd)
                raise LockHeld(holder or "holder unknown") from None
            if self._still_there(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # removed by its last holder as we opened it: open again
        raise LockHeld("holders that keep replacing the file")

    def _still_there(self, fd: int) -> bool:
        """Whether the file locked is the one at the path."""
        try:
            here, locked = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        if self.remove:
            self.path.unlink(missing_ok=True)  # while held: a waiter then finds it gone
        else:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _stamp_of(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
