"""What the loader yields: `Batch` (decoded), `EncodedBatch` (for GPU decoding), and, from the
dataset to the loader only, `Failure` and `CountReport`.

Images stay uint8 until the device: a worker sends 150 KB per 224 px image, not 600 KB of
float32, and the conversion and normalisation run where the model does (on a CPU run, in
the main process). `model_input` is that one step, and every consumer of a batch calls it
(`Batch.model_input`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from cratemae.data.shards import Miscount
from cratemae.data.transforms import normalize
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Batch", "CountReport", "EncodedBatch", "Failure", "model_input"]

Box = tuple[float, float, float, float]


@dataclass
class Batch:
    """A training/eval batch.

    images: uint8 (B, 3, S, S) pixels, channels-last in memory from the CPU loader
      (`cratemae.data.dataset.collate_images`); float32, already normalised, from fine-tuning's
      RandAugment transform (its random erasing draws noise on the normalised image).
      What a model takes is `model_input(device)`.
    labels: int64 (B,), or None when pre-training.
    bad: samples skipped since the producing worker's previous batch; each was replaced by a
      repeat of a good sample of this batch, so B stays the planned size.
    bad_shards: shard -> number of those bad samples, for the bad-fraction check.
    miscounts: shards found, while this batch was read, to hold another number of samples
      than declared (`cratemae.data.shards.Miscount`); the loader judges them.
    mean, std: the normalisation of uint8 `images` (the recipe's data.mean and data.std).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    bad: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)
    miscounts: tuple[Miscount, ...] = ()
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def model_input(self, device: torch.device | str) -> torch.Tensor:
        """The images as a model takes them: float32 (B, 3, S, S), normalised, on `device`."""
        return model_input(self.images, device, self.mean, self.std)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), labels=labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return replace(
            self, images=self.images.to(device, non_blocking=non_blocking), labels=labels
        )


def model_input(images: torch.Tensor, device: torch.device | str, mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (B, 3, S, S) -> float32 (x / 255 - mean) / std on `device`, the transfer
    asynchronous from pinned memory; float images (already normalised) are only moved.

    The normalisation is `normalize`'s, so its figures are those a worker used to send."""
    x = images.to(device, non_blocking=True)
    return normalize(x, mean, std) if x.dtype == torch.uint8 else x


@dataclass
class EncodedBatch:
    """A batch for `gpu_decode_batch` (data.decode = "gpu"): encoded JPEGs, not pixels.

    data: uint8 (total_bytes,), the JPEG files back to back (one tensor: one shared-memory
      handle per batch instead of B); image i is data[offsets[i]:offsets[i + 1]].
    offsets: int64 (B + 1,).
    boxes: float32 (B, 4), crop (left, top, right, bottom) in source pixels.
    flips: bool (B,).
    labels, bad, bad_shards, miscounts: as in `Batch`.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    labels: torch.Tensor | None
    bad: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)
    miscounts: tuple[Miscount, ...] = ()

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def pack(
        cls, items: list, labels: torch.Tensor | None, bad: int, bad_shards: dict[str, int]
    ) -> EncodedBatch:
        """From [((jpeg_bytes, box, flip), label), ...]."""
        blobs = [bytes(x[0][0]) for x in items]
        sizes = torch.tensor([0] + [len(b) for b in blobs], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        boxes = torch.tensor([x[0][1] for x in items], dtype=torch.float32)  # (B, 4)
        flips = torch.tensor([x[0][2] for x in items], dtype=torch.bool)  # (B,)
        return cls(data, torch.cumsum(sizes, 0), boxes, flips, labels, bad, bad_shards)

    def pin_memory(self) -> EncodedBatch:
        return replace(self, data=self.data.pin_memory())


@dataclass(frozen=True)
class Failure:
    """A BadInputError raised in a worker, carried to the main process as data."""

    message: str


@dataclass(frozen=True)
class CountReport:
    """Miscounts a stream found after its last yielded batch (a resumed epoch that skips
    all of a stream's batches still reads its shards): it follows every batch."""

    miscounts: tuple[Miscount, ...]
