"""`build_data`: the one entry point the training engine uses; `build_loader` for one epoch.

    data = build_data(recipe.data, split="train", augment="crop", labels=False,
                      img_size=224, seed=0, rank=r, world_size=w)  # resolves + counts once
    data.batches_per_epoch  # batches in every epoch, from the plan (no loader built)
    loader = data.loader(epoch=3, start_batch=k)
    len(loader)          # batches this iterator yields: epoch_batches - start_batch (all ranks)
    loader.epoch_batches # batches in the whole epoch
    loader.num_samples   # samples in the whole epoch on this rank (epoch_batches * batch_size
                         # when training)
    for batch in loader: # Batch (or EncodedBatch with data.decode = "gpu")
    data.positions()     # evaluation: each yielded sample's place in the data set

    build_loader(recipe.data, split=..., epoch=3, start_batch=k, ...)  # the same, one epoch

Training (split "train" with an augmentation) shuffles (shard order per epoch + a seeded
buffer), drops the remainder and augments; otherwise (`augment="none"`, or the val split)
the order is fixed, every sample kept, and the transform is the evaluation one. Bad samples
are counted as batches are yielded; `bad_fraction_error()` decides whether there were too
many, and the consumers (the training loop at every step, evaluation at the end of a split)
agree on it across ranks before they stop, so no rank stops alone while the others wait in
a collective.

A shard found to hold another number of samples than its declared count (shards.json,
`_info.json`) is logged when it has been read, naming the shard and both numbers. Training
warns and goes on: every rank still yields the plan's batches (see `cratemae.data.dataset`).
Evaluation, which promises every sample once, makes it the verdict: `count_error()`, which
`bad_fraction_error()` returns first, so the consumers' agreement covers it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import DataLoader

from cratemae.data.batch import Batch, CountReport, EncodedBatch, Failure
from cratemae.data.counts import fill_counts
from cratemae.data.dataset import EpochDataset, ReadConfig
from cratemae.data.gpu import gpu_decode_batch
from cratemae.data.plan import EpochPlan, make_plan, usable_workers
from cratemae.data.shards import Miscount
from cratemae.data.sources import Source, resolve_source
from cratemae.data.transforms import (
    BoxTransform,
    TimmTransform,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)
from cratemae.distributed.preemption import ignore_stop_signals
from cratemae.errors import BadInputError
from cratemae.recipe.schema import DataSection

__all__ = ["MIN_SAMPLES_FOR_BAD_CHECK", "Loader", "SplitData", "build_data", "build_loader"]

log = logging.getLogger("cratemae.data")

Split = Literal["train", "val"]
# "crop": random resized crop + flip (pre-training, MAE's probe, light fine-tuning);
# "randaugment": fine-tuning's timm pipeline (data.auto_augment, data.re_prob); "none": the
# evaluation transform (resize + centre crop) and a fixed order.
Augment = Literal["none", "crop", "randaugment"]
MIN_SAMPLES_FOR_BAD_CHECK = 200


def build_data(
    data: DataSection,
    *,
    split: Split,
    img_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    decode_device: torch.device | str | None = None,
    augment: Augment = "none",
    labels: bool = True,
) -> SplitData:
    """One split of the recipe's data for one rank, resolved and counted once: it plans
    every epoch and builds its loaders. BadInputError here for unusable data or settings
    (missing folder, no images, unreadable index, too few shards), before a run writes
    anything.

    `augment` chooses the transform (see `Augment`); `labels`: samples must carry class
    labels (an unlabelled sample is bad), else labels are read where present.
    With data.decode = "gpu" its loaders yield `EncodedBatch`es, or, given `decode_device`,
    `Batch`es decoded there (the decoding then counts as data time in the trainer's figures)."""
    if split not in ("train", "val") or augment not in ("none", "crop", "randaugment"):
        raise BadInputError(f"build_data: unknown split {split!r} or augment {augment!r}")
    if not 0 <= rank < world_size:
        raise BadInputError(f"build_data: rank {rank} outside world size {world_size}")
    training = split == "train" and augment != "none"
    gpu = data.decode == "gpu"
    if gpu and not torch.cuda.is_available():
        raise BadInputError("data.decode = 'gpu' needs CUDA, which is not available; use 'cpu'")
    if gpu and training and augment == "randaugment":
        raise BadInputError("data.decode = 'gpu' cannot run fine-tuning's RandAugment; use 'cpu'")
    source = resolve_source(data.train if split == "train" else data.val, split)
    if not source.counts_known and not (training and data.epoch_samples):
        source = fill_counts(source)
    workers = usable_workers(source, data.num_workers, world_size,
                             resampled=data.resampled and training)
    if workers < data.num_workers:
        log.warning("data.%s: %d shards for %d rank(s): %d of the %d workers "
                    "(data.num_workers) read them, a tar having one reader; cratemae shard "
                    "--max-per-shard N writes more shards", split, len(source.shards),
                    world_size, workers, data.num_workers)
        data = data.model_copy(update={"num_workers": workers})
    return SplitData(data, source, split=split, training=training, seed=seed, rank=rank,
                     world_size=world_size, img_size=img_size, labels=labels,
                     transform=_transform(data, augment if training else "none", img_size),
                     decode_device=decode_device if gpu else None)


def build_loader(
    data: DataSection,
    *,
    split: Split,
    img_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    decode_device: torch.device | str | None = None,
    augment: Augment = "none",
    labels: bool = True,
) -> Loader:
    """A loader for one epoch of one rank: `build_data(...).loader(epoch, start_batch)`,
    for callers that want a single epoch."""
    return build_data(data, split=split, img_size=img_size, seed=seed, rank=rank,
                      world_size=world_size, decode_device=decode_device, augment=augment,
                      labels=labels).loader(epoch, start_batch)


class SplitData:
    """One split of the data for one rank, from a source resolved and counted once.

    `batches_per_epoch` comes from the plan, not from a built loader. It is the same for
    every epoch (and every rank) in every plan mode: exact training reads
    floor(N / (world * batch)) batches of the N counted samples, exact evaluation
    ceil(ceil(N / world) / batch), dealt and resampled epochs epoch_samples (or N) //
    (world * batch); the epoch only reorders shards and samples, so `loader(e)` has
    `batches_per_epoch - start_batch` batches for any e. Plans cost no I/O; epoch 0's is
    made at construction, so settings the data cannot meet fail there."""

    def __init__(self, data: DataSection, source: Source, *, split: Split, training: bool,
                 seed: int, rank: int, world_size: int, img_size: int, labels: bool,
                 transform: BoxTransform | TimmTransform,
                 decode_device: torch.device | str | None) -> None:
        self.data, self.source, self.split, self.training = data, source, split, training
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.img_size, self.labels, self.transform = img_size, labels, transform
        self.decode_device = decode_device
        self._first = self._make_plan(0)

    @property
    def batches_per_epoch(self) -> int:
        return self._first.num_batches

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names, when the data carries them (cratemae shard / image folders)."""
        return self.source.classes

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of `epoch` (no I/O)."""
        return self._first if epoch == 0 else self._make_plan(epoch)

    def _make_plan(self, epoch: int) -> EpochPlan:
        return make_plan(
            self.source,
            split=self.split,
            batch_size=self.data.batch_size,
            num_streams=max(1, self.data.num_workers),
            training=self.training,
            resampled=self.data.resampled,
            epoch_samples=self.data.epoch_samples,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world=self.world_size,
        )

    def positions(self, epoch: int = 0) -> list[int]:
        """Global positions of the samples `loader(epoch)` yields, in yield order (exact
        plans; for evaluation)."""
        return self.plan(epoch).sample_positions(self.source)

    def loader(self, epoch: int, start_batch: int = 0) -> Loader:
        """The loader of `epoch`, from batch `start_batch` on (exact resume)."""
        plan = self.plan(epoch)
        if not 0 <= start_batch <= plan.num_batches:
            raise BadInputError(f"start_batch {start_batch} outside 0..{plan.num_batches}")
        gpu = self.data.decode == "gpu"
        cfg = ReadConfig(
            transform=self.transform,
            labelled=self.labels,
            gpu=gpu,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            shuffle_buffer=self.data.shuffle_buffer if self.training else 0,
            strict_counts=not self.training,
        )
        dataset = EpochDataset(self.source.shards, plan, cfg, start_batch)
        loader = Loader(dataset, plan, self.source, self.data, start_batch)
        if self.decode_device is not None:
            loader.decode_on = (torch.device(self.decode_device), self.img_size)
        return loader


def _transform(data: DataSection, augment: Augment, img_size: int
               ) -> BoxTransform | TimmTransform:
    """The transform `augment` names, with the recipe's normalisation."""
    if augment == "randaugment":
        try:
            return finetune_transform(img_size, data.mean, data.std, data.auto_augment,
                                      data.re_prob)
        except ValueError as err:
            raise BadInputError(f"data.auto_augment: {err}") from None
    if augment == "crop":
        return pretrain_transform(img_size, data.crop_scale, data.mean, data.std)
    return eval_transform(img_size, data.mean, data.std)


class Loader:
    """Iterates one epoch's batches of one rank; tracks bad samples per shard."""

    def __init__(
        self,
        dataset: EpochDataset,
        plan: EpochPlan,
        source: Source,
        data: DataSection,
        start_batch: int,
    ) -> None:
        self.dataset, self.plan, self.source = dataset, plan, source
        self.data, self.start_batch = data, start_batch
        self.seen = 0  # sample slots yielded so far (good + bad)
        self.bad = 0
        self.bad_by_shard: Counter[str] = Counter()
        self.miscounts: dict[str, Miscount] = {}  # shard -> its count found wrong, first seen
        self.decode_on: tuple[torch.device, int] | None = None  # (device, img_size)

    @property
    def epoch_batches(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names, when the data carries them (cratemae shard / image folders)."""
        return self.source.classes

    def __len__(self) -> int:
        return self.plan.num_batches - self.start_batch

    def __iter__(self) -> Iterator[Batch | EncodedBatch]:
        workers = self.data.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if workers else None,
            # Its base seed from a generator of its own, not torch's global one: a resumed
            # run, which starts one more iterator, continues the global stream exactly.
            generator=torch.Generator(),
            # A job's stop signal reaches every process of it: the workers keep serving
            # until this process has saved, then it ends them.
            worker_init_fn=ignore_stop_signals if workers else None,
        )
        it = iter(loader)
        try:
            for item in it:
                if isinstance(item, Failure):
                    raise BadInputError(item.message)
                self._note(item.miscounts)
                if isinstance(item, CountReport):
                    continue
                self.seen += len(item)
                if item.bad:
                    self.bad += item.bad
                    self.bad_by_shard.update(item.bad_shards)
                if self.decode_on is not None and isinstance(item, EncodedBatch):
                    device, size = self.decode_on
                    item = gpu_decode_batch(item, device, img_size=size, mean=self.data.mean,
                                            std=self.data.std)
                yield item
        finally:
            del it  # shuts the workers down now, not at garbage collection

    def _note(self, miscounts: tuple[Miscount, ...]) -> None:
        for m in miscounts:
            if m.shard in self.miscounts:
                continue
            self.miscounts[m.shard] = m
            if self.dataset.cfg.strict_counts:
                log.warning("%s: its declared count is wrong (an error at the end of the pass)",
                            m)
            else:
                log.warning("%s: its declared count is wrong; training keeps the planned %d "
                            "batches per epoch on every rank (a shortfall is refilled from "
                            "this rank's own shards, a surplus left unread)",
                            m, self.plan.num_batches)

    def count_error(self) -> BadInputError | None:
        """In evaluation, the error naming the first shard read whose declared count was
        wrong (its samples were not all read once); None when there was none, or in
        training, where it is a warning."""
        if not self.miscounts or not self.dataset.cfg.strict_counts:
            return None
        first, more = next(iter(self.miscounts.values())), len(self.miscounts) - 1
        others = f" (and {more} other shard{'s' if more > 1 else ''})" if more else ""
        return BadInputError(
            f"{first}{others}: its declared count (shards.json or _info.json) is wrong, so "
            "not every sample was read once; correct the count, or rewrite the shards with "
            "cratemae shard")

    def bad_fraction_error(self, final: bool = False) -> BadInputError | None:
        """The error to stop with: in evaluation a wrong declared count (`count_error`);
        else if more than data.max_bad_fraction of the samples seen so far were bad, naming
        the worst shards; None otherwise. Until 200 samples have been seen the fraction is
        too noisy to act on, unless `final` (the data are all seen)."""
        if (wrong := self.count_error()) is not None:
            return wrong
        if self.seen == 0 or (self.seen < MIN_SAMPLES_FOR_BAD_CHECK and not final):
            return None
        if self.bad / self.seen <= self.data.max_bad_fraction:  # 29 / 100 is 0.29 exactly
            return None
        worst = ", ".join(f"{s} ({n} bad)" for s, n in self.bad_by_shard.most_common(3))
        return BadInputError(
            f"{self.bad} of {self.seen} samples were bad ({100 * self.bad / self.seen:.1f}% > "
            f"data.max_bad_fraction {100 * self.data.max_bad_fraction:g}%); worst shards: "
            f"{worst}; the 'cratemae.data' log names the samples"
        )
