"""From `data.train` / `data.val` to a list of shards, with sample counts where knowable.

Accepted forms (a list mixes them):
- a brace pattern of tar files, `/data/in1k/train-{000000..001023}.tar`;
- a `pipe:` command or `http(s)://` URL pattern (counts unknown: see `cratemae.data.plan`);
- a directory written by `cratemae shard` (its `shards.json` gives names and counts):
  `data.train` reads its `train` split and `data.val` its `val` split;
- a directory of tar files, or of images (class sub-folders give labels; flat = unlabelled);
- `demo:train` / `demo:val`, the built-in demo data set.
Counts of local tars without a `shards.json` are found by reading their headers once, and
cached under the cache directory keyed by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cratemae.data.cache import cache_dir
from cratemae.data.folders import INDEX_NAME, list_images, read_index
from cratemae.data.shards import Shard, count_tar_samples, is_remote
from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_json

__all__ = ["Source", "fill_counts", "resolve_source"]

log = logging.getLogger("cratemae.data")

# Image folders are cut into virtual shards of this many files (they read randomly, so the
# size only sets how finely the epoch's order is shuffled).
FOLDER_SHARD = 256


@dataclass(frozen=True)
class Source:
    """The shards behind one `data.train`/`data.val` value."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...] | None = None
    # Image folders: any slice of a shard is as cheap to read as the whole.
    random_access: bool = False

    @property
    def counts_known(self) -> bool:
        return all(s.count is not None for s in self.shards)


def resolve_source(spec: str | list[str] | None, split: str) -> Source:
    """Resolve one recipe value; `split` ("train"/"val") names it in errors."""
    if spec is None or (isinstance(spec, list) and not spec):
        raise BadInputError(
            f"data.{split} is not set: give a shard pattern, folder or demo:{split}"
        )
    parts = [_resolve_one(s, split) for s in ([spec] if isinstance(spec, str) else spec)]
    classes = {p.classes for p in parts if p.classes is not None}
    if len(classes) > 1:
        raise BadInputError(f"data.{split}: its sources disagree on the class names")
    shards = tuple(s for p in parts for s in p.shards)
    if not shards:
        raise BadInputError(f"data.{split} = {spec!r}: no shards or images found")
    return Source(shards, next(iter(classes), None), all(p.random_access for p in parts))


def _resolve_one(spec: str, split: str) -> Source:
    if spec.startswith("demo:"):
        from cratemae.data.demo import ensure_demo  # the demo builds itself on first use

        if spec not in ("demo:train", "demo:val"):
            raise BadInputError(
                f"data.{split} = {spec!r}: the demo splits are demo:train, demo:val"
            )
        return _from_index(ensure_demo(), spec.removeprefix("demo:"), split)
    if is_remote(spec):
        from webdataset.shardlists import expand_urls

        return Source(tuple(Shard(u) for u in expand_urls(spec)))
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _from_index(path, split, split)
        tars = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if tars:
            return Source(tuple(Shard(str(p), _indexed_count(p)) for p in tars))
        return _from_folder(path, split)
    from webdataset.shardlists import expand_urls

    shards = []
    for url in expand_urls(str(path)):
        if not Path(url).is_file():
            raise BadInputError(f"{url}: shard file not found (data.{split} = {spec!r})")
        shards.append(Shard(url, _indexed_count(Path(url))))
    return Source(tuple(shards))


def _from_index(directory: Path, split: str, field: str) -> Source:
    index = read_index(directory)
    if split not in index["splits"]:
        have = ", ".join(index["splits"]) or "none"
        raise BadInputError(
            f"{directory}: has no {split!r} split (it has: {have}); for a val split rerun "
            f"cratemae shard with --val-fraction, or set data.{field} to other data"
        )
    shards = []
    for e in index["splits"][split]:
        p = directory / e["name"]
        if not p.is_file():
            raise BadInputError(f"{p}: shard file not found (listed in {directory / INDEX_NAME})")
        shards.append(Shard(str(p), int(e["samples"])))
    classes = index.get("classes")
    return Source(tuple(shards), tuple(classes) if classes else None)


_INDEX_CACHE: dict[str, dict[str, int]] = {}


def _indexed_count(path: Path) -> int | None:
    """The count a `shards.json` beside a tar gives it, if any."""
    d = str(path.parent)
    if d not in _INDEX_CACHE:
        counts: dict[str, int] = {}
        if (path.parent / INDEX_NAME).is_file():
            for entries in read_index(path.parent)["splits"].values():
                counts.update({e["name"]: int(e["samples"]) for e in entries})
        _INDEX_CACHE[d] = counts
    return _INDEX_CACHE[d].get(path.name)


def _from_folder(root: Path, split: str) -> Source:
    files, classes = list_images(root)
    if not files:
        raise BadInputError(f"{root}: no shards.json, tar files or images (data.{split})")
    shards = tuple(
        Shard(f"{root}#{i // FOLDER_SHARD}", len(chunk), tuple(chunk))
        for i in range(0, len(files), FOLDER_SHARD)
        for chunk in [files[i : i + FOLDER_SHARD]]
    )
    return Source(shards, classes, random_access=True)


def fill_counts(source: Source) -> Source:
    """Count the samples of local tars whose counts are unknown (cached on disk)."""
    todo = [s for s in source.shards if s.count is None and not is_remote(s.url)]
    if not todo:
        return source
    stats = [(s.url, os.stat(s.url).st_size, os.stat(s.url).st_mtime_ns) for s in todo]
    digest = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:20]
    path = cache_dir() / "counts" / f"{digest}.json"
    try:
        counts = {k: int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        t0 = time.perf_counter()
        log.info("counting samples in %d shards (once; set data.epoch_samples to skip)", len(todo))
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
        return count_tar_samples(url)
    except (OSError, EOFError, ValueError, tarfile.TarError) as err:
        msg = str(err).replace("\n", " ")
        raise BadInputError(f"{url}: not a readable tar file ({msg})") from None
