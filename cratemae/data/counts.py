"""Sample counts of shards that no index gives, found by reading them once and cached
under the cache directory, keyed by path, size and modification time (remote shards: by
URL): local tars by their headers, `pipe:`/URL shards by one pass over the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from dataclasses import replace

from cratemae.data.cache import cache_dir
from cratemae.data.shards import (
    ShardUnreachable,
    count_stream_samples,
    count_tar_samples,
    is_remote,
)
from cratemae.data.sources import Source
from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_json

__all__ = ["fill_counts"]

log = logging.getLogger("cratemae.data")


def fill_counts(source: Source) -> Source:
    """Count the samples of tars whose counts are unknown, by one read (cached on disk):
    the headers of local tars, the whole stream of `pipe:`/URL shards."""
    todo = [s for s in source.shards if s.count is None]
    if not todo:
        return source
    stats = [(s.url, None, None) if is_remote(s.url) else
             (s.url, os.stat(s.url).st_size, os.stat(s.url).st_mtime_ns) for s in todo]
    digest = hashlib.sha1(json.dumps(stats, allow_nan=False).encode()).hexdigest()[:20]
    path = cache_dir() / "counts" / f"{digest}.json"
    try:
        counts = json.loads(path.read_text())
        if not all(type(v) is int and v >= 0 for v in counts.values()):
            raise ValueError("a count that is not a whole number")  # a damaged cache: recount
    except (OSError, ValueError, AttributeError):
        t0 = time.perf_counter()
        remote = sum(is_remote(s.url) for s in todo)
        if remote:
            log.warning("counting the samples of %d pipe:/URL shards by reading them once "
                        "(cached in %s; when training, data.epoch_samples skips this pass)",
                        remote, path.parent)
        else:
            log.info("counting samples in %d shards (once, cached)", len(todo))
        counts = {s.url: _safe_count(s.url) for s in todo}
        log.info("counted %d samples in %.1fs", sum(counts.values()), time.perf_counter() - t0)
        try:
            atomic_write_json(path, counts)
        except OSError as err:  # a read-only cache only costs a recount next time
            log.warning("could not cache shard counts in %s: %s", path, err)
    shards = tuple(
        replace(s, count=counts.get(s.url, s.count)) if s.count is None else s
        for s in source.shards
    )
    return replace(source, shards=shards)


def _safe_count(url: str) -> int:
    try:
        return count_stream_samples(url) if is_remote(url) else count_tar_samples(url)
    except ShardUnreachable as err:
        raise BadInputError(str(err).replace("\n", " ")) from None
    except (OSError, EOFError, ValueError, tarfile.TarError) as err:
        msg = str(err).replace("\n", " ")
        raise BadInputError(f"{url}: not a readable tar file ({msg})") from None
