"""What `cratemae embed` reads: the data a user names (anything `data.val` accepts, image
files, or `@LIST` files), and a loader over this rank's share of it in evaluation order whose
batches carry each sample's key and whether its image could be read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cratemae.data import Batch, Loader
from cratemae.data.counts import fill_counts
from cratemae.data.dataset import EpochDataset, ReadConfig
from cratemae.data.decode import BadSample, parse_label
from cratemae.data.folders import IMAGE_EXTS
from cratemae.data.plan import make_plan, usable_workers
from cratemae.data.shards import RawSample, Shard
from cratemae.data.sources import Source, resolve_source
from cratemae.data.transforms import eval_transform
from cratemae.errors import BadInputError
from cratemae.guard import regular_file, special_kind
from cratemae.recipe.schema import DataSection

__all__ = ["FILES_PER_SHARD", "KeyedBatch", "data_source", "keyed_loader"]

log = logging.getLogger("cratemae")

FILES_PER_SHARD = 256  # a list of image files is read as virtual shards of this many


def data_source(inputs: Sequence[str], split: str = "val") -> Source:
    """The samples that `inputs` name, in order: any `data.val`/`data.train` value (image
    folder, `cratemae shard` directory, tar files or patterns, `demo:val`), image files,
    and `@LIST` (a text file naming one image file per line)."""
    parts: list[Source] = []
    files: list[str] = []

    def flush() -> None:
        if files:
            parts.append(_file_list(list(files)))
            files.clear()

    for item in inputs:
        if item.startswith("@"):
            files.extend(_read_list(Path(item[1:])))
        elif _is_image_file(item):
            files.append(item)
        else:
            flush()
            parts.append(resolve_source(item, split))
    flush()
    if not parts:
        raise BadInputError("no data given: name an image folder, shards, image files or @LIST")
    classes = {p.classes for p in parts if p.classes is not None}
    if len(classes) > 1:
        raise BadInputError("the data given disagree on the class names")
    source = Source(tuple(s for p in parts for s in p.shards), next(iter(classes), None),
                    all(p.random_access for p in parts))
    return fill_counts(source) if not source.counts_known else source


def _is_image_file(item: str) -> bool:
    """An image file named on its own; a FIFO, socket or device so named is refused."""
    if item.rpartition(".")[2].lower() not in IMAGE_EXTS:
        return False
    if special_kind(item) is not None:
        regular_file(item, "image")  # raises
    return Path(item).is_file()


def _read_list(path: Path) -> list[str]:
    regular_file(path, "@list")  # reading a FIFO would wait for a writer forever
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"@{path}: unreadable list of files ({err})") from None
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    base = path.parent
    names = [n if Path(n).is_absolute() else str(base / n) for n in names]
    special = next((n for n in names if special_kind(n) is not None), None)
    if special is not None:
        raise BadInputError(f"@{path}: names {special}, which is {special_kind(special)}, "
                            "not an image file; refused")
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise BadInputError(f"@{path}: {len(missing)} file(s) not found, e.g. {missing[0]}")
    return names


def _file_list(files: list[str]) -> Source:
    """Image files as virtual shards, as an image folder is read (no labels)."""
    shards = tuple(Shard(f"files#{i // FILES_PER_SHARD}", len(chunk), tuple(chunk))
                   for i in range(0, len(files), FILES_PER_SHARD)
                   for chunk in [[(f, -1) for f in files[i:i + FILES_PER_SHARD]]])
    return Source(shards, None, random_access=True)


@dataclass
class KeyedBatch(Batch):
    """A `Batch` with each sample's key and whether its image could be read; labels -1
    where a sample has none."""

    keys: tuple[str, ...] = ()
    valid: torch.Tensor | None = None  # bool (B,)


class _KeyedDataset(EpochDataset):
    """The loader's dataset, keeping each sample's key, label (if any) and whether it could
    be read: a bad sample's place holds a repeat of another, which must not be written as
    its features."""

    def _batch(self, chunk: list[RawSample], log: Any) -> KeyedBatch:
        self._labels: list[int] = []
        self._valid: list[bool] = []
        batch = super()._batch(chunk, log)
        return KeyedBatch(batch.images, torch.tensor(self._labels, dtype=torch.int64),
                          batch.bad, batch.bad_shards, mean=batch.mean, std=batch.std,
                          keys=tuple(r.key for r in chunk),
                          valid=torch.tensor(self._valid, dtype=torch.bool))

    def _one(self, raw: RawSample, out: Any = None) -> tuple:  # out: `EpochDataset._one`
        try:
            image, _ = super()._one(raw, out)
        except BadSample:
            self._labels.append(-1)
            self._valid.append(False)
            raise
        self._labels.append(parse_label(raw) if "cls" in raw.parts else -1)
        self._valid.append(True)
        return image, -1


def keyed_loader(source: Source, data: DataSection, img_size: int, rank: int, world: int,
            start_batch: int) -> Loader:
    """The evaluation loader (fixed order, every sample, evaluation transform) of `source`,
    yielding `KeyedBatch`es from `start_batch` on."""
    workers = usable_workers(source, data.num_workers, world, resampled=False)
    data = data.model_copy(update={"num_workers": workers})
    plan = make_plan(source, split="val", batch_size=data.batch_size,
                     num_streams=max(1, workers), training=False, resampled=False,
                     epoch_samples=None, seed=0, epoch=0, rank=rank, world=world)
    cfg = ReadConfig(transform=eval_transform(img_size, data.mean, data.std), labelled=False,
                     shuffle_buffer=0, seed=0, epoch=0, rank=rank)
    dataset = _KeyedDataset(source.shards, plan, cfg, start_batch)
    return Loader(dataset, plan, source, data, start_batch)
