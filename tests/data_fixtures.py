"""Helpers for the data tests: tiny images, hand-made tar shards, corrupt members.

Imported explicitly by tests/test_data_*.py, and by the training tests for small data sets
with a known number of corrupt samples (`shards_with_bad`).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cratemae.recipe.schema import DataSection

__all__ = [
    "data_section",
    "encode",
    "image_tree",
    "label_stream",
    "labelled_shards",
    "make_shards",
    "photo",
    "shards_with_bad",
    "solid",
    "write_tar",
]


def solid(i: int, size: int = 12) -> Image.Image:
    """An RGB image for sample i: red = i % 256 and blue = 77 everywhere, green a
    left-to-right ramp (so crops and flips show)."""
    arr = np.empty((size, size, 3), np.uint8)
    arr[..., 0], arr[..., 2] = i % 256, 77
    arr[..., 1] = np.linspace(0, 255, size).round().astype(np.uint8)[None, :]
    return Image.fromarray(arr)


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs (astronaut, coffee, chelsea, camera...)."""
    from skimage import data

    return getattr(data, name)()


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def make_shards(
    root: Path, counts: list[int], *, prefix: str = "train", index: bool = True, size: int = 12
) -> list[Path]:
    """Shards of solid images; sample j overall has key `s{shard}_{j}` and label j.

    With `index`, a shards.json gives the counts (as `cratemae shard` would)."""
    root.mkdir(parents=True, exist_ok=True)
    paths, j = [], 0
    for s, n in enumerate(counts):
        members = []
        for _ in range(n):
            members += [(f"s{s}_{j}.png", encode(solid(j, size))), (f"s{s}_{j}.cls", b"%d" % j)]
            j += 1
        paths.append(write_tar(root / f"{prefix}-{s:06d}.tar", members))
    if index:
        entries = [{"name": p.name, "samples": n} for p, n in zip(paths, counts, strict=True)]
        (root / "shards.json").write_text(json.dumps({"splits": {prefix: entries}}))
    return paths


# Three ways a sample can be bad, each skipped and counted by the loader (see decode.py).
CORRUPT = (
    lambda key: [(f"{key}.jpg", b"this is a text file, not a JPEG"), (f"{key}.cls", b"0")],
    lambda key: [(f"{key}.png", b""), (f"{key}.cls", b"0")],  # zero-byte member
    lambda key: [(f"{key}.txt", b"no image in this sample"), (f"{key}.cls", b"0")],
)


def shards_with_bad(
    root: Path, counts: list[int], bad: set[int], *, size: int = 12
) -> tuple[Path, int]:
    """Shards `train-*.tar` with a shards.json, like `make_shards`, but the samples numbered
    in `bad` (over all shards) are corrupt, the three kinds in turn. -> (root, len(bad))."""
    root.mkdir(parents=True, exist_ok=True)
    j, entries = 0, []
    for s, n in enumerate(counts):
        members = []
        for _ in range(n):
            key = f"s{s}_{j}"
            members += (CORRUPT[len([b for b in bad if b < j]) % len(CORRUPT)](key) if j in bad
                        else [(f"{key}.png", encode(solid(j, size))), (f"{key}.cls", b"%d" % j)])
            j += 1
        entries.append({"name": write_tar(root / f"train-{s:06d}.tar", members).name,
                        "samples": n})
    if not bad <= set(range(j)):
        raise ValueError(f"bad samples {sorted(bad)} outside 0..{j - 1}")
    (root / "shards.json").write_text(json.dumps({"splits": {"train": entries}}))
    return root, len(bad)


def data_section(train, **kw) -> DataSection:
    """A DataSection with small defaults for tests."""
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    return DataSection(train=train, **kw)


def label_stream(loader) -> list[int]:
    """Every label the loader yields, in order."""
    return [int(y) for b in loader for y in b.labels]


def labelled_shards(root: Path, prefix: str, counts: list[int], classes: int = 2) -> None:
    """Shards `PREFIX-00000S.tar` of solid images labelled j % classes, no shards.json."""
    root.mkdir(parents=True, exist_ok=True)
    j = 0
    for s, n in enumerate(counts):
        members = []
        for _ in range(n):
            members += [(f"s{s}_{j}.png", encode(solid(37 * j))),
                        (f"s{s}_{j}.cls", b"%d" % (j % classes))]
            j += 1
        write_tar(root / f"{prefix}-{s:06d}.tar", members)


def image_tree(root: Path, classes: list[str], per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            solid(10 * c + i).save(root / name / f"{i}.png")
    return root


def read_shards(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """The members of `out/{split}-*.tar`: key -> extension -> bytes."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def shape_folders(root: Path, train: int, val: int, classes: int = 3) -> tuple[Path, Path]:
    """train/ and val/ image folders of demo shapes under `root`: `classes` class folders
    with `train` and `val` 32 px PNGs each, drawn from seeds that name class, index, split."""
    from cratemae.data.demo import CLASSES, render

    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / CLASSES[c]).mkdir(parents=True)
            for i in range(n):
                img = render(c, np.random.default_rng([c, i, len(split)]))
                Image.fromarray(img).save(root / split / CLASSES[c] / f"{i}.png")
    return root / "train", root / "val"
