"""Samples that are not image files: records of a download format (CIFAR's pixel rows, a
Parquet row group) made into items to shard, or into shards to read in place.

Each format module (`cifar`, `parquet`) lists its splits as `Records`; the writer shards
them as it shards files, and the readers wrap a `RecordSlice` of them in a `Shard`, so a
data set read in place and its shards hold the same labels and pixels, by the same code.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cratemae.data.decode import BadSample, load_rgb, open_image
from cratemae.guard import regular_file

__all__ = ["Item", "RecordSlice", "Records", "image_member", "load_image_file", "png_bytes"]

_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@dataclass(frozen=True)
class Item:
    """One sample to write: `load()` -> (extension, bytes), raising BadSample if unusable."""

    key: str
    label: int  # -1: unlabelled
    load: Callable[[], tuple[str, bytes]]
    origin: str = ""  # for the report of skipped files


@dataclass(frozen=True)
class Records:
    """A data set's samples, split by split, ready to shard. `ordered`: keep this order
    (the format shuffled it already, in an order it can read with bounded memory)."""

    layout: str  # what was recognised, for the log ("CIFAR-10, binary version")
    splits: dict[str, Sequence[Item]]
    classes: tuple[str, ...] | None
    class_names: tuple[str, ...] | None = None
    ordered: bool = False


class RecordSlice(Protocol):
    """Samples lo..hi-1 of one piece of a data set read in place (picklable: it travels
    to the DataLoader workers inside its `Shard`)."""

    def samples(self, lo: int, hi: int | None) -> Iterator[tuple[str, str, bytes, int]]:
        """(key, extension, encoded image, label) for each sample."""
        ...


def png_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as a lossless PNG (the pixels come back exactly)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def load_image_file(path: str) -> tuple[str, bytes]:
    """A source file -> ("jpg", original bytes) / ("png", original or re-encoded bytes). A
    FIFO, socket or device is refused (`guard.regular_file`): reading it would never end."""
    regular_file(path, "image")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadSample(f"unreadable: {err.strerror}") from None
    return image_member(data)


def image_member(data: bytes) -> tuple[str, bytes]:
    """Encoded image bytes -> ("jpg", the bytes) / ("png", the bytes or a lossless PNG);
    BadSample when they are no readable image."""
    if not data:
        raise BadSample("empty file")
    img = open_image(data)
    if img.format == "JPEG":
        load_rgb(img, draft=(64, 64))  # full entropy decode at 1/8 scale: finds truncation
        return "jpg", data
    try:
        img.load()
    except Exception as err:
        raise BadSample(f"corrupt image ({type(err).__name__})") from None
    if img.format == "PNG":
        return "png", data
    if img.mode not in _PNG_MODES:
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "png", buf.getvalue()
