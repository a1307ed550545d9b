"""The IterableDataset behind the loader: streams of raw samples -> decoded batches.

Each DataLoader worker runs one stream of the plan and yields whole batches (the DataLoader
is built with batch_size=None); the DataLoader visits workers round-robin, so with stream
(start_batch + w) % S on worker w the batches arrive in plan order. Batches before
`start_batch` are cut from the raw sample stream, after the (seeded) shuffle buffer but
before decoding: resuming costs reading headers and shuffling references, not images.

A bad sample keeps its place: it is replaced by a repeat of a good sample of the same batch
(all-bad batch: zeros), and counted in the batch's `bad`, so batch shapes never change and
the count reaches the training loop.

Declared counts found wrong while reading (`iter_shard`'s `Miscount`s) ride on the next batch
of the stream; a stream reads on to the end of its last piece before yielding its last batch,
so every check is done by then. `ReadConfig.strict_counts` says what a stream does about a
shard that held fewer samples than declared: in evaluation (strict) its slots stay, as bad
samples, and the loader's verdict is an error; in training the stream refills the shortfall
from its own pieces, read again from the first, so it still yields its planned batches with
real samples, and the same ones on a resume.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from cratemae.data.batch import Batch, CountReport, EncodedBatch, Erasures, Failure
from cratemae.data.decode import BadLog, BadSample, image_bytes, load_rgb, open_image, parse_label
from cratemae.data.plan import (
    TAG_BUFFER,
    TAG_DEAL,
    TAG_RESAMPLE,
    TAG_SAMPLE,
    EpochPlan,
    StreamSpec,
    rng_for,
)
from cratemae.data.shards import Miscount, RawSample, Shard, close_files, iter_shard
from cratemae.data.transforms import Augmented, Box, BoxTransform, TimmTransform
from cratemae.errors import BadInputError

__all__ = ["EpochDataset", "ReadConfig"]


@dataclass(frozen=True)
class ReadConfig:
    """Everything a worker needs besides the plan; small and picklable."""

    transform: BoxTransform | TimmTransform
    labelled: bool
    shuffle_buffer: int  # 0 = no shuffling inside streams (evaluation)
    seed: int
    epoch: int
    rank: int
    gpu: bool = False  # yield EncodedBatch (JPEG bytes + boxes) for gpu_decode_batch
    max_pixels: int = 89_478_485
    # A shard holding another number of samples than declared: True (evaluation, every
    # sample once) leaves its slots bad for the loader to refuse; False (training) refills.
    strict_counts: bool = True


class EpochDataset(IterableDataset):
    """One rank's epoch; iterate in-process or through DataLoader workers."""

    def __init__(
        self, shards: tuple[Shard, ...], plan: EpochPlan, cfg: ReadConfig, start_batch: int = 0
    ) -> None:
        super().__init__()
        self.shards, self.plan, self.cfg, self.start_batch = shards, plan, cfg, start_batch

    def __iter__(self) -> Iterator[Batch | EncodedBatch | Failure | CountReport]:
        info, n = get_worker_info(), len(self.plan.streams)
        first = self.start_batch % n
        close_files()
        try:
            if info is None:  # in-process: visit the streams round-robin, as workers would
                gens = [self._stream(self.plan.streams[(first + i) % n]) for i in range(n)]
                yield from _round_robin(gens)
            elif info.id < n:
                yield from self._stream(self.plan.streams[(first + info.id) % n])
        except BadInputError as err:  # crosses the process boundary as data, stays one line
            yield Failure(str(err))

    def _stream(self, spec: StreamSpec) -> Iterator[Batch | EncodedBatch | CountReport]:
        found: list[Miscount] = []
        raw = self._raw(spec, found.append)
        if self.cfg.shuffle_buffer > 1:
            rng = rng_for(self.cfg.seed, self.cfg.epoch, TAG_BUFFER, self.cfg.rank, spec.index)
            raw = _shuffled(raw, self.cfg.shuffle_buffer, rng)
        log = BadLog()
        ids = spec.batch_ids()
        for b in ids:
            chunk = list(itertools.islice(raw, self.plan.batch_len(b)))
            if b == ids[-1] and spec.mode == "exact":
                for _ in raw:  # nothing is left: this reads on to where the counts are checked
                    pass
            if b < self.start_batch:
                continue  # skipped without decoding
            while len(chunk) < self.plan.batch_len(b):  # the stream ran dry: count as bad
                chunk.append(RawSample("(stream)", f"#{len(chunk)}", missing="no more samples"))
            batch = self._batch(chunk, log)
            batch.miscounts, found[:] = tuple(found), []
            yield batch
        if found:
            yield CountReport(tuple(found))

    def _raw(self, spec: StreamSpec, report: Callable[[Miscount], None]
             ) -> Iterator[RawSample]:
        pad = self.cfg.strict_counts
        if spec.mode == "exact":
            got = 0
            for shard, lo, hi in spec.segments:
                for s in iter_shard(self.shards[shard], lo, hi, on_miscount=report, pad=pad):
                    got += 1
                    yield s
            yield from self._refill(spec, sum(hi - lo for _, lo, hi in spec.segments) - got)
            return
        tag = TAG_RESAMPLE if spec.mode == "resampled" else TAG_DEAL
        rng = rng_for(self.cfg.seed, self.cfg.epoch, tag, self.cfg.rank, spec.index)
        if spec.mode == "resampled":
            draws = (spec.pool[int(rng.integers(len(spec.pool)))] for _ in itertools.count())
        else:  # dealt: cycle over own shards, reshuffled each pass
            draws = (i for _ in itertools.count() for i in rng.permutation(spec.pool))
        empty, failed, reason = 0, set(), ""
        for i in draws:
            got = 0
            for s in iter_shard(self.shards[int(i)], on_miscount=report, pad=pad):
                got += s.missing is None
                reason = s.missing or reason
                yield s
            empty, failed = (0, set()) if got else (empty + 1, failed | {int(i)})
            if empty >= max(len(spec.pool), 10):
                # Resampling draws a shard more than once: name the shards, not the tries.
                raise BadInputError(
                    f"no samples could be read from {_shards_phrase(len(failed), len(spec.pool))}"
                    f" ({empty} tries in a row); last tried {self.shards[int(i)].url}: "
                    f"{reason or 'empty'} (see the 'cratemae.data' log)"
                )

    def _refill(self, spec: StreamSpec, need: int) -> Iterator[RawSample]:
        """`need` samples to make up for shards that held fewer than declared (training):
        the stream's pieces read again from the first, as often as it takes. Bad samples
        only if they hold none at all."""
        while need > 0:
            before = need
            for shard, lo, hi in spec.segments:
                for s in iter_shard(self.shards[shard], lo, hi, pad=False):
                    yield s
                    need -= 1
                    if need == 0:
                        return
            if need == before:
                break
        for i in range(need):
            yield RawSample("(stream)", f"#{i}", missing="no samples to refill a short shard")

    def _batch(self, chunk: list[RawSample], log: BadLog) -> Batch | EncodedBatch:
        tf = self.cfg.transform
        # uint8 (B, S, S, 3): each crop is written straight into its slot (`crop_into`)
        direct = isinstance(tf, BoxTransform) and not self.cfg.gpu
        pixels = new_pixels(len(chunk), tf.img_size) if direct else None
        slots = None if pixels is None else pixels.numpy()
        items, bad = [], Counter()
        for i, raw in enumerate(chunk):
            try:
                items.append(self._one(raw, None if slots is None else slots[i]))
            except BadSample as err:
                log(raw.shard, raw.key, str(err))
                bad[raw.shard] += 1
                items.append(None)
        good = [x for x in items if x is not None]
        if good:  # fill each bad slot with a repeat of the batch's good samples, in order
            fill = itertools.cycle(good)
            for i, x in enumerate(items):
                if x is None:
                    items[i] = next(fill)
                    if slots is not None:  # the repeat's pixels, copied into this slot
                        slots[i] = items[i][0]
        elif self.cfg.gpu:
            items = [((_black_jpeg(), (0.0, 0.0, 8.0, 8.0), False), 0)] * len(chunk)
        elif slots is not None:
            slots.fill(0)
            items = [(None, 0)] * len(chunk)
        else:
            s = tf.img_size
            items = [(Augmented(torch.zeros(3, s, s, dtype=torch.uint8), None), 0)] * len(chunk)
        labels = torch.tensor([y for _, y in items]) if self.cfg.labelled else None
        if self.cfg.gpu:
            return EncodedBatch.pack(items, labels, sum(bad.values()), dict(bad))
        erase = None
        if pixels is not None:
            x = pixels.permute(0, 3, 1, 2)  # (B, 3, S, S), channels-last
        else:  # fine-tuning's RandAugment
            x = collate_images([a.pixels for a, _ in items])
            erase = Erasures.pack([a.erase for a, _ in items])
        return Batch(x, labels, sum(bad.values()), dict(bad), mean=tf.mean, std=tf.std,
                     erase=erase)

    def _one(self, raw: RawSample, out: np.ndarray | None = None) -> tuple:
        """-> (`Augmented`, label) for RandAugment; (`out`, label) with the crop written
        into `out`, uint8 (S,S,3); for GPU decode ((bytes, box, flip), label)."""
        data = image_bytes(raw)
        label = parse_label(raw) if self.cfg.labelled else -1
        rng = np.random.default_rng(
            [self.cfg.seed % 2**64, self.cfg.epoch, TAG_SAMPLE, _key_hash(raw)]
        )
        img = open_image(data, self.cfg.max_pixels)
        tf = self.cfg.transform
        if isinstance(tf, TimmTransform):
            return tf(load_rgb(img), rng), label
        if self.cfg.gpu:
            box, flip = tf.box(*img.size, rng)
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                data = _to_jpeg(load_rgb(img))  # nvJPEG takes baseline RGB/grey JPEG only
            return (data, box, flip), label
        assert out is not None  # `_batch` gives a slot to every crop
        crop_into(img, tf, rng, out)
        return out, label


def crop_into(img: Image.Image, tf: BoxTransform, rng: np.random.Generator,
              out: np.ndarray) -> None:
    """An opened (undecoded) image -> its crop's pixels written into `out`, uint8 (S, S, 3)
    (a slot of the batch, `new_pixels`): the box and flip drawn from `rng`, decoded (at
    reduced scale where the box allows, `draft_rgb`), resized (bicubic) and flipped by
    Pillow, then copied once, as they lie, out of Pillow into the batch."""
    box, flip = tf.box(*img.size, rng)
    rgb, box = draft_rgb(img, box, tf.img_size)
    resized = rgb.resize((tf.img_size,) * 2, Image.Resampling.BICUBIC, box=box)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out[...] = np.asarray(resized)  # (S, S, 3)


def crop_sample(img: Image.Image, tf: BoxTransform, rng: np.random.Generator) -> torch.Tensor:
    """`crop_into` for one image -> uint8 (3, S, S), a view of its (S, S, 3) pixels."""
    s = tf.img_size
    out = np.empty((s, s, 3), dtype=np.uint8)
    crop_into(img, tf, rng, out)
    return torch.from_numpy(out).permute(2, 0, 1)  # (3, S, S)


def draft_rgb(img: Image.Image, box: Box, size: int) -> tuple[Image.Image, Box]:
    """Decode to RGB, a JPEG at 1/2, 1/4 or 1/8 scale while `box` stays at least `size`
    pixels on its short side; -> (image, `box` in its pixels)."""
    w, h = img.size
    scale = max(min(box[2] - box[0], box[3] - box[1]) / size, 1.0)
    rgb = load_rgb(img, draft=(int(w / scale), int(h / scale)))
    fx, fy = rgb.size[0] / w, rgb.size[1] / h  # draft may have shrunk it 2/4/8x
    return rgb, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def new_pixels(n: int, size: int) -> torch.Tensor:
    """uint8 (n, size, size, 3), for a batch's crops (`crop_into`); permuted to (n, 3, S, S)
    it is channels-last. In a worker it is made in shared memory, as the DataLoader's own
    collation does, so sending the batch to the main process copies nothing more."""
    return _new_flat(torch.uint8, n * size * size * 3).view(n, size, size, 3)


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images (3, S, S) -> (B, 3, S, S), channels-last in memory ((B, S, S, 3)
    underneath), as the loader's own batches (whose crops are written straight into their
    slots, `new_pixels`): the device makes the batch contiguous as it converts it to float
    (`model_input`), where transposing costs nothing. In a worker the batch is made in
    shared memory (`new_pixels`). Fine-tuning's RandAugment pixels come this way."""
    b, (c, h, w) = len(images), images[0].shape
    out = new_pixels(b, h).permute(0, 3, 1, 2)  # (B, 3, S, S) channels-last
    assert w == h and c == 3, images[0].shape
    return torch.stack(images, out=out)


def _new_flat(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """An uninitialised 1-D tensor; in a DataLoader worker, in shared memory
    (torch.utils.data.default_collate's way)."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    return empty.new(empty._typed_storage()._new_shared(numel))


def _shards_phrase(failed: int, pool: int) -> str:
    """"the only shard", "any of the 3 shards", "2 of the 40 shards" (of one reader): never
    more shards than there are."""
    if pool == 1:
        return "the only shard of this reader"
    what = "any" if failed >= pool else str(failed)
    return f"{what} of the {pool} shards of this reader"


def _key_hash(raw: RawSample) -> int:
    """64-bit hash of (shard file name, key): the sample's identity for its augmentation."""
    name = raw.shard.rstrip("/").rsplit("/", 1)[-1]
    # surrogateescape: a file name that is not UTF-8 hashes as its own bytes
    text = f"{name}/{raw.key}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _to_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _black_jpeg() -> bytes:
    """Stand-in for an all-bad batch on the GPU path (the count still says it is bad)."""
    return _to_jpeg(Image.new("RGB", (8, 8)))


def _shuffled(src: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer: holds `size` raw samples (references, for local tars)."""
    buf: list = []
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _round_robin(gens: list[Iterator]) -> Iterator:
    """Items of several generators in turn, skipping exhausted ones (DataLoader's order)."""
    active = list(gens)
    while active:
        for g in list(active):
            try:
                yield next(g)
            except StopIteration:
                active.remove(g)
