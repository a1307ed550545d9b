"""Reading samples out of one shard: a WebDataset tar (local, `pipe:` or URL) or a folder.

A sample is the group of consecutive tar members sharing a key (`KEY.jpg`, `KEY.cls`), as in
WebDataset. `iter_shard(shard, lo, hi)` yields samples lo..hi-1; the ones before `lo` are
skipped from their headers alone (local tars seek past the data), which is what makes
resuming mid-epoch cheap. Local tars hand out references (path, offset, size) instead of
bytes, so a shuffle buffer holds a few bytes per sample and only decoded samples are read.

Declared counts (`Shard.count`: shards.json, `_info.json`, the counting cache) are checked
here, the one place every reader goes through: a reader that asks for them
(`on_miscount`) and whose piece ends at the shard's declared end reads on to the shard's
real end, and one whose piece the shard cannot fill finds where the shard ended; either way
a count that differs is reported as a `Miscount` (declared, read). A shard that breaks off
(a truncated or unreadable tar) is not a miscount: its missing samples are bad samples.

A local path is opened only when it is a regular file (`cratemae.guard.regular_file`): a
FIFO, socket or device where a shard or image is expected is refused, never waited on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cratemae.guard import regular_file

__all__ = [
    "Miscount",
    "RawSample",
    "Ref",
    "Shard",
    "ShardUnreachable",
    "close_files",
    "count_stream_samples",
    "count_tar_samples",
    "is_remote",
    "iter_shard",
    "read_part",
    "split_key",
]

log = logging.getLogger("cratemae.data")

# (path, byte offset, size); size -1 means "the whole file" (image folders).
Ref = tuple[str, int, int]
# Members no larger than this are read at once (labels); larger ones become references.
_EAGER_BYTES = 4096
# WebDataset's rule: the key is the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a tar file/URL, or a slice of an image folder (`files`)."""

    url: str
    count: int | None = None  # samples in it, when known
    # Image folders: (file path, label or -1) for each sample, in order.
    files: tuple[tuple[str, int], ...] | None = None
    # A download format read in place (`cratemae.data.records.RecordSlice`: a CIFAR batch
    # file, a Parquet row group): its `samples(lo, hi)` give (key, ext, bytes, label).
    records: Any = None

    @property
    def name(self) -> str:
        """The shard's file name: stable when a data set moves, so it seeds augmentations."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]


class ShardUnreachable(OSError):
    """No tar data came from a `pipe:` command or URL at all (a wrong host or path, no
    network): said so with the URL, not as tarfile's "empty file"."""


@dataclass
class RawSample:
    """An undecoded sample; `missing` says why it could not be read at all."""

    shard: str
    key: str
    parts: dict[str, bytes | Ref] = field(default_factory=dict)
    missing: str | None = None


@dataclass(frozen=True)
class Miscount:
    """A shard whose samples, read to its end, are not the number it was declared to hold."""

    shard: str
    declared: int
    read: int

    def __str__(self) -> str:
        return f"{self.shard}: declared {self.declared} samples, read {self.read}"


def is_remote(url: str) -> bool:
    """A `pipe:` command or a URL with a scheme other than file://."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def split_key(name: str) -> tuple[str, str] | None:
    """('dir/KEY', 'ext') for a member name, None for names without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class _FdCache:
    """A few open files per process, read with pread (no shared offsets after fork)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.fds: OrderedDict[str, int] = OrderedDict()

    def read(self, ref: Ref) -> bytes:
        path, offset, size = ref
        fd = self.fds.pop(path, None)
        if fd is None:
            regular_file(path, "data file")  # a FIFO would block the open forever
            fd = os.open(path, os.O_RDONLY)
            while len(self.fds) >= self.size:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd
        if size < 0:
            size = os.fstat(fd).st_size
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    def close_all(self) -> None:
        """Forget open files (a shard rewritten since would otherwise read stale)."""
        while self.fds:
            os.close(self.fds.popitem()[1])


_FDS = _FdCache()


def close_files() -> None:
    """Close the files `read_part` keeps open in this process; called at each epoch start."""
    _FDS.close_all()


def read_part(part: bytes | Ref) -> bytes:
    """The bytes of a sample part, reading a reference from disk."""
    return part if isinstance(part, bytes) else _FDS.read(part)


def iter_shard(shard: Shard, lo: int = 0, hi: int | None = None, *,
               on_miscount: Callable[[Miscount], None] | None = None,
               pad: bool = True) -> Iterator[RawSample]:
    """Samples lo..hi-1 of `shard`. With `hi` given, exactly hi-lo samples come out: any the
    shard fails to deliver (truncated, unreadable) come as `missing` placeholders, and so,
    with `pad`, do those of a shard that ended cleanly before `hi` (without `pad` the caller
    makes up for them).

    `on_miscount`: told when the shard's declared count is found wrong (see the module
    docstring); a piece ending at the declared end then reads the rest of the shard's
    headers, which hold no samples when the count is right."""
    declared = shard.count
    check = (on_miscount is not None and declared is not None and shard.files is None
             and shard.records is None)
    to_end = check and declared is not None and (hi is None or hi >= declared)
    seen = [0]  # samples whose first header has been read, lo's predecessors included
    n, clean = 0, False
    try:
        if shard.records is not None:
            src = _iter_records(shard, lo, hi)
        elif shard.files is not None:
            src = _iter_folder(shard, lo, hi)
        else:
            src = _iter_tar(shard, lo, hi, seen, read_on=to_end)
        for sample in src:
            n += 1
            yield sample
        reason, clean = "shard ended early", True
    except ShardUnreachable as err:
        reason = str(err).replace("\n", " ")
        log.warning("%s", reason)
    except (OSError, EOFError, tarfile.TarError, ValueError) as err:
        reason = f"shard unreadable: {type(err).__name__}: {err}".replace("\n", " ")
        log.warning("%s: %s (after %d samples)", shard.url, reason, lo + n)
    # The real count is known when read to the end, or where the shard ended inside the piece.
    known = clean and (to_end or (hi is not None and seen[0] < hi))
    if check and known and on_miscount is not None and seen[0] != declared:
        on_miscount(Miscount(shard.url, int(declared or 0), seen[0]))
    want = None if hi is None else hi - lo
    if want is None and declared is not None:
        want = declared - lo
    missing = (want - n) if want is not None else (0 if clean else 1)
    if clean and not pad:
        missing = 0
    for i in range(max(missing, 0)):
        yield RawSample(shard.url, f"#{lo + n + i}", missing=reason)


def _iter_folder(shard: Shard, lo: int, hi: int | None) -> Iterator[RawSample]:
    files = shard.files or ()
    for path, label in files[lo:hi]:
        ext = Path(path).suffix.lower().lstrip(".") or "img"
        parts: dict[str, bytes | Ref] = {ext: (path, 0, -1)}
        if label >= 0:
            parts["cls"] = str(label).encode()
        yield RawSample(shard.url, path, parts)  # the key is the file's path: unique, findable


def _iter_records(shard: Shard, lo: int, hi: int | None) -> Iterator[RawSample]:
    for key, ext, data, label in shard.records.samples(lo, hi):
        parts: dict[str, bytes | Ref] = {ext: data}
        if label >= 0:
            parts["cls"] = str(label).encode()
        yield RawSample(shard.url, key, parts)


def _open_tar(url: str) -> tarfile.TarFile:
    path = url.removeprefix("file://")
    if not is_remote(url):
        regular_file(path, "shard")  # a FIFO would block the open; pipes/URLs are streams
    if not is_remote(url) and path.endswith(".tar"):
        return tarfile.open(path, mode="r:")
    from webdataset.gopen import gopen  # only for pipes/URLs/compressed tars

    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as err:
        raise ShardUnreachable(f"{url}: unreachable ({err})") from None
    try:
        return tarfile.open(fileobj=stream, mode="r|*")
    except (OSError, tarfile.TarError) as err:
        _close_quietly(stream)
        if isinstance(err, OSError) or "empty file" in str(err):
            raise ShardUnreachable(f"{url}: unreachable: no data came from it ({err})") from None
        raise


def _close_quietly(stream: object) -> None:
    with contextlib.suppress(Exception):  # a failed pipe reports its exit status on close
        stream.close()  # type: ignore[attr-defined]


def _iter_tar(shard: Shard, lo: int, hi: int | None, seen: list[int] | None = None,
              read_on: bool = False) -> Iterator[RawSample]:
    """Samples lo..hi-1 of a tar; `seen[0]` follows how many samples have begun, and with
    `read_on` the headers after `hi` are read to the end of the tar to count them."""
    seen = [0] if seen is None else seen
    tf = _open_tar(shard.url)
    seekable = tf.mode == "r" and not is_remote(shard.url) and shard.url.endswith(".tar")
    path = shard.url.removeprefix("file://")
    index, key, parts = -1, None, {}
    end = hi if hi is not None else float("inf")
    try:
        while (ti := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every header otherwise
            kx = split_key(ti.name) if ti.isfile() else None
            if kx is None:
                continue
            if kx[0] != key:
                if key is not None and lo <= index < end:
                    yield RawSample(shard.url, key, parts)
                index, key, parts = index + 1, kx[0], {}
                seen[0] = index + 1
                if index >= end and not read_on:
                    return
            if not lo <= index < end:
                continue  # skipped or counted sample: header only, data never read
            if seekable and ti.size > _EAGER_BYTES:
                parts[kx[1]] = (path, ti.offset_data, ti.size)
            else:
                f = tf.extractfile(ti)
                parts[kx[1]] = f.read() if f is not None else b""
        if seekable and os.path.getsize(path) - tf.offset < 1024:
            # tarfile ends quietly at a cut-off header; the last sample may be incomplete
            raise tarfile.ReadError("truncated tar (no end-of-archive marker)")
        if key is not None and lo <= index < end:
            yield RawSample(shard.url, key, parts)
    finally:
        try:
            tf.close()
            if tf.fileobj is not None and not seekable:
                tf.fileobj.close()
        except Exception:  # a pipe killed on purpose may complain
            pass


def _running_count(tf: tarfile.TarFile) -> Iterator[int]:
    """The number of samples (key groups) so far, each time a new one starts, reading only
    the headers (members are not kept, so memory stays flat on a long tar)."""
    n, last = 0, None
    while (ti := tf.next()) is not None:
        tf.members.clear()
        kx = split_key(ti.name) if ti.isfile() else None
        if kx is not None and kx[0] != last:
            n, last = n + 1, kx[0]
            yield n


def count_stream_samples(url: str) -> int:
    """Number of samples in a `pipe:`/URL shard: one pass over its stream, reading the
    headers while the data streams by. ShardUnreachable when no data comes at all."""
    n = 0
    tf = _open_tar(url)
    try:
        for n in _running_count(tf):  # noqa: B007 - the last count is the answer
            pass
    finally:
        _close_quietly(tf)
        _close_quietly(tf.fileobj)
    return n


def count_tar_samples(path: str) -> int:
    """Number of samples (key groups) in a local tar, reading only the headers. A tar that
    breaks off counts what precedes the break, as reading it will deliver just those."""
    n = 0
    regular_file(path, "shard")
    with tarfile.open(path, mode="r:") as tf:
        try:
            for n in _running_count(tf):  # noqa: B007 - the last count is the answer
                pass
        except (OSError, EOFError, tarfile.TarError) as err:
            log.warning("%s: unreadable after %d samples (%s)", path, n, err)
    return n
