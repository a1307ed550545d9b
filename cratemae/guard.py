"""The checks every command makes on the paths it is given, before any work: the one place
that says what may be read as a file and where output may go.

- `regular_file(path, what)`: a path read as a file must be a regular file. A FIFO, socket
  or device is refused at once (opening a FIFO waits forever for a writer; reading
  `/dev/zero` never ends).
- `check_output(out, kind=..., reads=...)`: where a command writes. Refused, with exit 2
  and one line: a special file (a FIFO, `/dev/full`), a file where a directory is wanted or
  the reverse, a path that is, holds or lies inside one of the inputs being read, a path
  inside any run's `checkpoints/` (retention prunes it, and a resume reads it), and a place
  that cannot be written (its nearest existing folder is not a writable directory).

Like `cratemae.fs` it sits at the bottom of the package: it imports only the other
top-level modules (`errors`, `rundir`), so every package may use it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cratemae.errors import BadInputError
from cratemae.rundir import CKPT_DIR, RunFiles

__all__ = ["check_output", "regular_file", "special_kind"]

PathLike = str | os.PathLike[str]


def special_kind(path: PathLike) -> str | None:
    """'a FIFO', 'a socket', 'a device' (what `path` is, links followed) when it exists and
    is neither a regular file nor a directory; else None. Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def regular_file(path: PathLike, what: str = "") -> Path:
    """`path`, checked to be a regular file when it exists (links followed); a FIFO, socket,
    device or directory is one `error:` line, exit 2. A missing path is returned as it is:
    the caller says what a missing file means."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    kind = special_kind(path)
    if kind is not None:
        raise BadInputError(f"{label}: is {kind}, not a regular file; refused")
    if path.is_dir():
        raise BadInputError(f"{label}: is a directory, not a file")
    return path


def check_output(out: PathLike, *, kind: str = "file", reads: Iterable[PathLike] = (),
                 flag: str = "--out") -> Path:
    """Refuse (exit 2, one line) an output `out` that is not a safe place to write a `kind`
    ('file' or 'dir'): see the module docstring. `reads` are the files and folders the
    command reads (a checkpoint, its run, the data). Returns `out`."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    out = Path(out)
    label = f"{flag} {out}" if flag else str(out)
    special = special_kind(out)
    if special is not None:
        wanted = "file" if kind == "file" else "directory"
        raise BadInputError(f"{label}: is {special}, not a {wanted}; give a path to write to")
    if kind == "file" and out.is_dir():
        raise BadInputError(f"{label}: is a directory; give a file name")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise BadInputError(f"{label}: is a file, not a directory")
    where = out.resolve()
    for read in reads:
        source = Path(read).resolve()
        if where == source:
            raise BadInputError(f"{label}: is the input {read} being read; give another path")
        if source.is_dir() and where.is_relative_to(source):
            raise BadInputError(f"{label}: inside {read}, which is being read; "
                                f"write outside it")
        if kind == "dir" and source.is_relative_to(where):
            raise BadInputError(f"{label}: holds the input {read} being read; "
                                f"give another directory")
    for folder in (where, *where.parents):
        if folder.name == CKPT_DIR and RunFiles(folder.parent).is_run():
            raise BadInputError(f"{label}: inside the checkpoints of the run {folder.parent}, "
                                f"which retention prunes and resume reads; write elsewhere")
    _check_writable(where, label)
    return out


def _check_writable(where: Path, label: str) -> None:
    """The nearest existing folder of `where` must be a directory this process can write."""
    probe = where if where.is_dir() else where.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: nothing can be created through it
            raise BadInputError(f"{label}: cannot be written: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise BadInputError(f"{label}: cannot be written: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{label}: cannot be written: no permission to write in {probe}")
