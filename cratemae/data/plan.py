"""The epoch plan: which samples each rank and each worker reads, in which batches.

Every rank yields the same number of batches, so DDP never waits on a rank that ran dry.

- Known counts ("exact"): the shards are put in a seeded per-epoch order and read as one
  sequence of N samples. Training gives each rank a contiguous slice of
  `floor(N / (world * batch)) * batch` samples (the remainder is dropped; which samples fall
  in it changes each epoch with the shard order), so each sample is seen at most once and
  all but fewer than world*batch exactly once. Evaluation keeps every sample: ranks get
  ceil(N / world) samples, a rank one short repeats its last (as DistributedSampler does),
  and the last batch may be smaller.
- Unknown counts ("dealt", remote shards when training with `data.epoch_samples`; without
  it the sources count them by one pass): `data.epoch_samples` sets the epoch length; the
  shuffled shards are dealt to the world's readers, each cycling over its own. Known counts
  make the epoch: an `epoch_samples` that differs from them is refused, not ignored.
- `data.resampled`: each reader draws shards with replacement; `data.epoch_samples` (or the
  known total) sets the epoch length.

Within a rank, batch b is made by reader (stream) b % S, S = max(1, num_workers), and each
stream reads one contiguous run of the rank's samples: a worker opens few shards and reads
the ones it skips at most once. `EpochPlan.sample_positions` walks the streams the same way
to say where each yielded sample sits in the data set (evaluation counts each sample once).
Changing num_workers or world size mid-epoch changes which samples the rest of that epoch
holds; resume with the same values for exact continuation.

The plan trusts the declared counts and never changes with what is read: every rank's batch
count is fixed before the epoch starts. The readers check the counts as they read
(`cratemae.data.shards.iter_shard`): the stream whose run ends at a shard's declared end
reads on to its real end, and a shard declared empty is given to one stream of one rank as
an empty piece `(shard, 0, 0)`, so that it is read too. What a wrong count does (an error in
evaluation; in training a warning, the stream refilling a shortfall from its own pieces) is
the dataset's and the loader's (`cratemae.data.dataset`, `cratemae.data.loader`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from cratemae.data.sources import Source
from cratemae.errors import BadInputError

__all__ = ["EpochPlan", "StreamSpec", "make_plan", "rng_for", "usable_workers",
           "workers_needed"]

# Distinct tags keep the seeded generators of different purposes independent.
TAG_ORDER, TAG_DEAL, TAG_RESAMPLE, TAG_BUFFER, TAG_SAMPLE = 11, 12, 13, 14, 15

Segment = tuple[int, int, int]  # (shard index, first sample, end sample)


def rng_for(seed: int, epoch: int, tag: int, *more: int) -> np.random.Generator:
    """A generator determined by (seed, epoch, purpose, ...) alone."""
    return np.random.default_rng([seed % 2**64, epoch % 2**64, tag, *more])


@dataclass(frozen=True)
class StreamSpec:
    """What one reader of one rank produces: batches `first, first+step, ...` (rank-local
    numbering) from `segments` (exact mode) or by cycling over/drawing from `pool`."""

    index: int
    num_batches: int
    first: int
    step: int
    mode: str  # "exact" | "dealt" | "resampled"
    segments: tuple[Segment, ...] = ()
    pool: tuple[int, ...] = ()

    def batch_ids(self) -> range:
        return range(self.first, self.first + self.num_batches * self.step, self.step)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: its streams, batch count and sample count."""

    streams: tuple[StreamSpec, ...]
    num_batches: int
    num_samples: int
    batch_size: int
    last_size: int  # size of the final batch (== batch_size when training)
    mode: str

    def batch_len(self, b: int) -> int:
        return self.last_size if b == self.num_batches - 1 else self.batch_size

    def sample_positions(self, source: Source) -> list[int]:
        """Global positions (the order `source` lists its samples) of this rank's samples,
        in the order its batches are yielded (batch 0 first). Each stream is walked as
        `EpochDataset` reads it (`spec.batch_ids()`, each batch the next `batch_len(b)` samples
        of the stream's run), so the dealing rule lives in the plan alone. Exact plans only:
        the other modes draw shards at random, so positions are unknown before reading."""
        if self.mode != "exact":
            raise BadInputError("evaluation needs sample counts (local shards or cratemae shard)")
        starts = np.cumsum([0] + [int(s.count or 0) for s in source.shards])
        by_batch: list[list[int]] = [[] for _ in range(self.num_batches)]
        for spec in self.streams:
            run = [int(starts[s]) + i for s, lo, hi in spec.segments for i in range(lo, hi)]
            taken = 0
            for b in spec.batch_ids():
                by_batch[b] = run[taken:taken + self.batch_len(b)]
                taken += self.batch_len(b)
        return [p for batch in by_batch for p in batch]


def usable_workers(source: Source, num_workers: int, world: int, *, resampled: bool) -> int:
    """The data workers one rank can keep busy: a tar is read by one reader, so with fewer
    than world x num_workers tars each rank uses shards // world of its num_workers (the
    shards of a small data set, CIFAR's two or Flowers' one, then feed fewer workers instead
    of refusing the recipe). Random-access sources and resampled training have no such
    bound. Below one shard per rank it returns num_workers unchanged: `make_plan` refuses."""
    if source.random_access or resampled or num_workers <= 1:
        return num_workers
    per_rank = len(source.shards) // world
    return num_workers if per_rank < 1 else min(num_workers, per_rank)


def make_plan(
    source: Source,
    *,
    split: str,
    batch_size: int,
    num_streams: int,
    training: bool,
    resampled: bool,
    epoch_samples: int | None,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
) -> EpochPlan:
    """Plan one rank's epoch; BadInputError when the data cannot feed every reader."""
    n_shards, readers = len(source.shards), world * num_streams
    if resampled and training:
        total = epoch_samples or sum(s.count or 0 for s in source.shards)
        if not total:
            raise BadInputError(f"data.{split}: the sample counts of its shards are unknown: "
                                "give data.epoch_samples (samples per epoch)")
        return _infinite_plan(source, "resampled", total, batch_size, num_streams, rank, world)
    if training and epoch_samples and source.counts_known:
        total = sum(int(s.count or 0) for s in source.shards)
        if epoch_samples != total:  # an exact epoch reads each sample once: N, not another
            raise BadInputError(
                f"data.epoch_samples = {epoch_samples:,}, but the counts of data.{split}'s "
                f"shards are known ({total:,} samples) and an epoch reads each once: remove "
                f"data.epoch_samples, or set data.resampled = true to draw {epoch_samples:,} "
                "samples per epoch")
    if n_shards < readers and not source.random_access:
        raise BadInputError(
            f"data.{split}: {n_shards} shards for {world} ranks x {num_streams} workers = "
            f"{readers} readers; use fewer workers (data.num_workers), more shards "
            "(cratemae shard --max-per-shard), or data.resampled = true"
        )
    if not source.counts_known:
        if not training or not epoch_samples:
            raise BadInputError(
                f"data.{split}: the sample counts of {source.shards[0].url} ... are unknown: "
                "give data.epoch_samples (samples per epoch, training only), or write the "
                "shards with cratemae shard (which records them)"
            )
        return _infinite_plan(
            source,
            "dealt",
            epoch_samples,
            batch_size,
            num_streams,
            rank,
            world,
            seed=seed,
            epoch=epoch,
        )
    return _exact_plan(source, split, batch_size, num_streams, training, seed, epoch, rank, world)


def _exact_plan(
    source: Source,
    split: str,
    batch: int,
    n_streams: int,
    training: bool,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
) -> EpochPlan:
    counts = np.array([s.count for s in source.shards], dtype=np.int64)
    order = rng_for(seed, epoch, TAG_ORDER).permutation(len(counts)) if training else None
    order = np.arange(len(counts)) if order is None else order
    ends = np.cumsum(counts[order])  # global sample position where each ordered shard ends
    total = int(ends[-1]) if len(ends) else 0
    if training:
        per_rank = (total // (world * batch)) * batch
        if per_rank == 0:
            raise BadInputError(
                f"data.{split}: {total} samples cannot fill one batch on each rank "
                f"({world} ranks x batch {batch}); lower data.batch_size"
            )
        segs = _segments(order, ends, rank * per_rank, (rank + 1) * per_rank)
        n_batches, last, n = per_rank // batch, batch, per_rank
    else:
        if total == 0:
            raise BadInputError(f"data.{split}: no samples")
        base, extra = divmod(total, world)
        start = rank * base + min(rank, extra)
        n = base + (1 if extra else 0)
        mine = base + (1 if rank < extra else 0)
        segs = _segments(order, ends, start, start + mine)
        if mine < n:  # one short: repeat this rank's last sample (or the first, if empty)
            p = start + mine - 1 if mine else 0
            segs += _segments(order, ends, p, p + 1)
        n_batches = math.ceil(n / batch)
        last = n - (n_batches - 1) * batch
    empty = [int(i) for i in order if counts[i] == 0][rank::world]  # read, to check them
    return _deal(segs, n, n_batches, batch, last, n_streams, empty)


def subset_plan(source: Source, positions: np.ndarray, batch_size: int, num_streams: int
                ) -> EpochPlan:
    """An evaluation plan (one rank) that reads only `positions` of `source`: sorted,
    distinct sample positions in the order the shards are listed (counts known).

    Laid out as every evaluation plan: the samples in position order, each stream a
    contiguous run of them. Only the chosen samples are decoded."""
    counts = np.array([s.count for s in source.shards], dtype=np.int64)
    order, ends = np.arange(len(counts)), np.cumsum(counts)
    n = len(positions)
    if n == 0:
        raise BadInputError("subset_plan: no positions")
    if positions[0] < 0 or positions[-1] >= (ends[-1] if len(ends) else 0):
        raise BadInputError(f"subset_plan: positions outside 0..{int(ends[-1]) - 1}")
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # where a run of neighbours ends
    segs = [seg for run in np.split(positions, breaks)
            for seg in _segments(order, ends, int(run[0]), int(run[-1]) + 1)]
    n_batches = math.ceil(n / batch_size)
    return _deal(segs, n, n_batches, batch_size, n - (n_batches - 1) * batch_size,
                 num_streams)


def _deal(segs: list[Segment], n: int, n_batches: int, batch: int, last: int,
          n_streams: int, empty: list[int] | tuple[int, ...] = ()) -> EpochPlan:
    """An exact plan: batch b made by stream b % n_streams, each stream reading the next
    contiguous run of the `n` samples of `segs`; the shards declared `empty` go, as empty
    pieces after their runs, to the streams that yield batches."""
    checks: list[list[Segment]] = [[] for _ in range(n_streams)]
    for j, shard in enumerate(empty):
        checks[j % max(1, min(n_streams, n_batches))].append((shard, 0, 0))
    streams, offset = [], 0
    for s in range(n_streams):
        ids = range(s, n_batches, n_streams)
        size = sum(last if b == n_batches - 1 else batch for b in ids)
        run = _cut(segs, offset, offset + size) + tuple(checks[s])
        streams.append(StreamSpec(s, len(ids), s, n_streams, "exact", segments=run))
        offset += size
    return EpochPlan(tuple(streams), n_batches, n, batch, last, "exact")


def _segments(order: np.ndarray, ends: np.ndarray, a: int, b: int) -> list[Segment]:
    """Global positions [a, b) as (shard, lo, hi) pieces of the ordered shards."""
    out: list[Segment] = []
    i = bisect.bisect_right(ends.tolist(), a) if a < b else len(ends)
    while a < b and i < len(ends):
        start = int(ends[i - 1]) if i else 0
        hi = min(b, int(ends[i]))
        if hi > a:
            out.append((int(order[i]), a - start, hi - start))
        a, i = hi, i + 1
    return out


def _cut(segs: list[Segment], a: int, b: int) -> tuple[Segment, ...]:
    """Positions [a, b) of a segment list."""
    out, pos = [], 0
    for shard, lo, hi in segs:
        n = hi - lo
        x, y = max(a, pos), min(b, pos + n)
        if x < y:
            out.append((shard, lo + x - pos, lo + y - pos))
        pos += n
    return tuple(out)


def _infinite_plan(
    source: Source,
    mode: str,
    total: int,
    batch: int,
    n_streams: int,
    rank: int,
    world: int,
    *,
    seed: int = 0,
    epoch: int = 0,
) -> EpochPlan:
    n_batches = total // (world * batch)
    if n_batches == 0:
        raise BadInputError(
            f"epoch of {total} samples cannot fill one batch on each rank "
            f"({world} ranks x batch {batch}); raise data.epoch_samples or lower data.batch_size"
        )
    n_shards = len(source.shards)
    order = rng_for(seed, epoch, TAG_DEAL).permutation(n_shards)
    streams = []
    for s in range(n_streams):
        reader = rank * n_streams + s
        pool = (
            tuple(range(n_shards))
            if mode == "resampled"
            else tuple(int(i) for i in order[reader :: world * n_streams])
        )
        n = len(range(s, n_batches, n_streams))
        streams.append(StreamSpec(s, n, s, n_streams, mode, pool=pool))
    return EpochPlan(tuple(streams), n_batches, n_batches * batch, batch, batch, mode)


def workers_needed(rate: float, per_worker: float) -> int:
    """DataLoader workers (per rank) that deliver `rate` images/s when each delivers
    `per_worker`: ceil(rate / per_worker), at least 1. ValueError unless both are above 0."""
    if not (rate > 0 and per_worker > 0) or math.isinf(rate) or math.isinf(per_worker):
        raise ValueError(f"rate {rate} and per_worker {per_worker}: both must be finite, above 0")
    return max(1, math.ceil(rate / per_worker - 1e-9))
