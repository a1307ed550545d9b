"""Atomic file writes: the one way this package writes a file.

A reader (another rank, a later run, a user's tool) must see either the old file or the new
one, whole, never a half-written one, whatever happens mid-write: an exception, Ctrl-C,
`kill -9`, a power cut. So every write goes to a temporary file in the same directory (same
file system, so the rename cannot become a copy), which is flushed and fsynced, renamed over
the target with `os.replace` (atomic on POSIX), and the directory is fsynced so that the
rename itself survives a crash. On any exception the temporary file is removed and the old
file is untouched.

Temporary names are hidden siblings, `.NAME.tmp-PID-RANDOM`: the process id says who left
one behind, the random part keeps threads and forked workers of one process apart, and the
leading dot keeps them out of every `*.tar`, `step-*` or `*.png` a reader scans for. Files
get the user's umask (`0o666 & ~umask`, as `open()` gives), not the private 0o600 of
`mkstemp` or of safetensors' `save_file`.

Two forms: `atomic_write(path)` yields a file object; `atomic_path(path)` yields the
temporary path, for libraries that want a file name (safetensors' `save_file`, matplotlib's
`savefig`, `torch.onnx.export`). `AtomicFile` is the object behind `atomic_write`, for a
writer that keeps a file open across calls (the shard writer).

This module imports nothing of cratemae, so that every package may use it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "AtomicFile",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "is_temp_name",
    "naming",
    "pid_alive",
    "strict_json",
    "temp_path",
]

PathLike = str | os.PathLike[str]
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
# fsync errors that mean "this file system cannot do that", not "the data is lost".
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is alive (someone else's counts): a temporary or a
    lock it left is then in use, not debris."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_path(path: PathLike) -> Path:
    """A fresh hidden sibling of `path`: `.NAME.tmp-PID-RANDOM` (not created here)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one `temp_path` makes (debris, if no write is in progress)."""
    return _TEMP_RE.match(name) is not None


def fsync_file(path: PathLike) -> None:
    """Flush a file that was written and closed (possibly by a library) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (creations, renames) to the disk; without it a crash can
    forget a rename. Where the platform or file system cannot open or fsync a directory
    there is nothing more to do, and that is not an error; a real I/O error is raised."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file, open for writing, that becomes `path` on `commit()` and vanishes on
    `discard()`. Use `atomic_write` unless the file must stay open across calls."""

    def __init__(self, path: PathLike, mode: str = "wb", *, encoding: str | None = None) -> None:
        if mode not in ("wb", "w"):
            raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        # O_EXCL: never write into someone else's file; 0o666: the umask applies.
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        try:
            text = {"encoding": encoding or "utf-8"} if mode == "w" else {}
            self.file: IO[Any] = os.fdopen(fd, mode, **text)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        """Flush, fsync, close and rename the file into place; fsync the directory."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; `path` is left as it was."""
        try:
            self.file.close()
        except OSError:
            pass  # a failed flush of data that is being thrown away
        finally:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def naming(path: PathLike) -> Iterator[None]:
    """An OSError raised in the block that names no file (a `write` on a full disk) is
    raised again naming `path`, so that the one line a user sees says where."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


@contextmanager
def atomic_write(
    path: PathLike, mode: str = "wb", *, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a file object (mode "wb", or "w" for UTF-8 text) whose content replaces `path`
    when the block ends normally; on an exception `path` is untouched and nothing is left."""
    with naming(path):
        pending = AtomicFile(path, mode, encoding=encoding)
        try:
            yield pending.file
        except BaseException:
            pending.discard()
            raise
        pending.commit()


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path for a library to write (it must create the file there); the
    file replaces `path` when the block ends normally, and is removed on an exception.
    The file is given the umask's permissions whatever the library chose (safetensors'
    `save_file` makes its files 0o600)."""
    final = Path(path)
    with naming(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
        wanted = _umask_mode(tmp)
        try:
            yield tmp
            _chmod(tmp, wanted)  # FileNotFoundError if the writer wrote nothing
            fsync_file(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)


def _umask_mode(probe: Path) -> int:
    """The permissions `open()` gives a new file here (0o666 less the umask), learnt by
    creating `probe` and removing it again: reading the umask means setting it, which
    would race with other threads."""
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def _chmod(path: Path, wanted: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) == wanted:
        return
    try:
        os.chmod(path, wanted)
    except OSError as err:  # a file system without POSIX permissions: nothing to fix
        if err.errno not in _UNSUPPORTED | {errno.EPERM, errno.EACCES}:
            raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 1) -> None:
    """Replace `path` with `obj` as indented strict JSON (`strict_json`: a non-finite number
    becomes null, named under "nonfinite") and a final newline, atomically."""
    atomic_write_text(path, strict_json(obj, indent=indent) + "\n")


def strict_json(obj: Any, *, indent: int | None = None) -> str:
    """`obj` as strict JSON, which has no NaN or infinity: a non-finite number is written as
    null, and a dict that held one gains `"nonfinite": [its keys]`, so that a reader knows
    the null was a NaN or an infinity (a diverged loss), not a missing value."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        out = {k: _finite(v) for k, v in obj.items()}
        bad = [k for k, v in obj.items() if isinstance(v, float) and out[k] is None]
        if bad:
            out["nonfinite"] = sorted({*out.get("nonfinite", []), *bad})
        return out
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
