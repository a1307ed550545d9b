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

__all__ = ["Batch", "CountReport", "EncodedBatch", "Erasures", "Failure", "model_input"]

Box = tuple[float, float, float, float]


@dataclass
class Batch:
    """A training/eval batch.

    images: uint8 (B, 3, S, S) pixels, channels-last in memory from the CPU loader
      (`cratemae.data.dataset.collate_images`). What a model takes is `model_input(device)`.
    labels: int64 (B,), or None when pre-training.
    bad: samples skipped since the producing worker's previous batch; each was replaced by a
      repeat of a good sample of this batch, so B stays the planned size.
    bad_shards: shard -> number of those bad samples, for the bad-fraction check.
    miscounts: shards found, while this batch was read, to hold another number of samples
      than declared (`cratemae.data.shards.Miscount`); the loader judges them.
    mean, std: the normalisation of uint8 `images` (the recipe's data.mean and data.std).
    erase: fine-tuning's random erasing (`Erasures`), applied after the normalisation; or
      None.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    bad: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)
    miscounts: tuple[Miscount, ...] = ()
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    erase: Erasures | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def model_input(self, device: torch.device | str) -> torch.Tensor:
        """The images as a model takes them: float32 (B, 3, S, S), normalised, on `device`."""
        return model_input(self.images, device, self.mean, self.std, self.erase)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        erase = None if self.erase is None else self.erase.pin_memory()
        return replace(self, images=self.images.pin_memory(), labels=labels, erase=erase)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return replace(
            self, images=self.images.to(device, non_blocking=non_blocking), labels=labels
        )


@dataclass
class Erasures:
    """A batch's random erasing (timm's, drawn in the worker by `TimmTransform`), in two
    tensors rather than a small tensor per image.

    boxes: int64 (E, 5), rows (image, top, left, h, w).
    noise: float32 (sum of 3*h*w,), each box's (3, h, w) values back to back, NaN where the
      image keeps its own pixels.
    """

    boxes: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def pack(cls, erases: Sequence[tuple[int, int, torch.Tensor] | None]) -> Erasures | None:
        """From each image's (top, left, noise (3, h, w)), or None where it has none."""
        drawn = [(i, e) for i, e in enumerate(erases) if e is not None]
        if not drawn:
            return None
        rows = [(i, top, left, *noise.shape[1:]) for i, (top, left, noise) in drawn]
        noise = torch.cat([noise.reshape(-1) for _, (_, _, noise) in drawn])
        return cls(torch.tensor(rows, dtype=torch.int64), noise)

    def pin_memory(self) -> Erasures:
        return Erasures(self.boxes, self.noise.pin_memory())

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Write the boxes into the normalised images x (B, 3, S, S), in place; -> x."""
        noise = self.noise.to(x.device, non_blocking=True)
        offset = 0
        for i, top, left, h, w in self.boxes.tolist():
            patch = noise[offset:offset + 3 * h * w].view(3, h, w)
            offset += 3 * h * w
            region = x[i, :, top:top + h, left:left + w]
            region.copy_(torch.where(patch.isnan(), region, patch))
        return x


def model_input(images: torch.Tensor, device: torch.device | str, mean: Sequence[float],
                std: Sequence[float], erase: Erasures | None = None) -> torch.Tensor:
    """uint8 pixels (B, 3, S, S) -> float32 (x / 255 - mean) / std on `device`, the transfer
    asynchronous from pinned memory; then fine-tuning's random erasing, if any.

    The normalisation is `normalize`'s, the figures of timm's ToTensor + Normalize, so what
    a model sees is what a worker used to send."""
    x = normalize(images.to(device, non_blocking=True), mean, std)
    return x if erase is None else erase.apply_(x)


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
