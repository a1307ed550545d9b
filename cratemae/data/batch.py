"""What the loader yields: `Batch` (decoded), `EncodedBatch` (for GPU decoding), and, from the
dataset to the loader only, `Failure` and `CountReport`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cratemae.data.shards import Miscount

__all__ = ["Batch", "CountReport", "EncodedBatch", "Failure"]

Box = tuple[float, float, float, float]


@dataclass
class Batch:
    """A training/eval batch.

    images: float32 (B, 3, S, S), normalized with data.mean/std.
    labels: int64 (B,), or None when pre-training.
    bad: samples skipped since the producing worker's previous batch; each was replaced by a
      repeat of a good sample of this batch, so B stays the planned size.
    bad_shards: shard -> number of those bad samples, for the bad-fraction check.
    miscounts: shards found, while this batch was read, to hold another number of samples
      than declared (`cratemae.data.shards.Miscount`); the loader judges them.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    bad: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)
    miscounts: tuple[Miscount, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), labels=labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return replace(
            self, images=self.images.to(device, non_blocking=non_blocking), labels=labels
        )


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
