"""The CPU data path, per worker: cratemae's loader against torchvision's on the same JPEGs.

Builds ImageNet-like JPEGs once (crops of scikit-image's colour photographs, 500x375 and
375x500, quality 90) under --work, as an ImageFolder tree and as cratemae shards, then times
in one run, with MAE's pre-training transform (RandomResizedCrop 224, scale 0.2-1, bicubic,
flip, normalise) and batch 64:

- JPEG decode alone (Pillow, full size), one core;
- cratemae's per-sample work alone (read the header, decode, crop to uint8; and + normalise);
- torchvision `ImageFolder` + `DataLoader` (ToTensor, Normalize), at 1 and 2 workers;
- cratemae's loader (`cratemae.bench.data.bench_data`, task pretrain, what `cratemae
  bench-data` runs) on the shards, at 1 and 2 workers;

and prints images/s, the ratio to torchvision per worker count, and where the loader's time
per image goes (reading the shards, decoding, cropping into the batch, the batch's
shared-memory segment, and what is left: the queue, pickling and scheduling).

    .venv/bin/python benchmarks/data_path.py [--work DIR] [--images 2000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cratemae.bench.data import bench_data
from cratemae.data.dataset import crop_into, crop_sample, draft_rgb
from cratemae.data.decode import image_bytes, open_image
from cratemae.data.shards import iter_shard
from cratemae.data.sources import resolve_source
from cratemae.data.transforms import normalize, pretrain_transform
from cratemae.data.writer import write_shards
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD, DataSection

BATCH, SIZE = 64, 224
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")
CLASSES = 10


def build_images(work: Path, n: int) -> tuple[Path, Path]:
    """`n` JPEGs under work/images/CLASS/ (built once) and their shards under work/shards."""
    folder, shards = work / f"images-{n}", work / f"shards-{n}"
    done = work / f".images-{n}-done"  # beside the tree: ImageFolder takes no loose files
    if not done.exists():
        import skimage.data

        photos = [getattr(skimage.data, p)()[..., :3] for p in PHOTOS]
        rng = np.random.default_rng(0)
        for i in range(n):
            src = Image.fromarray(photos[i % len(photos)])
            w, h = (500, 375) if i % 3 else (375, 500)
            # A random crop of the photograph at the target aspect, resized: every file differs.
            s = rng.uniform(0.5, 1.0)
            cw = min(src.width, int(src.height * w / h)) * s
            ch = cw * h / w
            left, top = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
            img = src.resize((w, h), Image.Resampling.BICUBIC,
                             box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out = folder / f"c{i % CLASSES}" / f"{i:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out, "JPEG", quality=90)
        done.touch()
    if not (shards / "shards.json").exists():
        write_shards(folder, shards, max_per_shard=max(1, n // 8))
    return folder, shards


def cpu_seconds() -> float:
    """User + system CPU of this process and its joined children (the loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def rate(fn: Callable[[], int], repeats: int) -> tuple[float, float]:
    """The best (images/s, images per CPU-second) of `repeats` runs of fn (which returns
    the images it handled)."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        count = fn()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        best = max(best, (count / wall, count / max(cpu, 1e-9)))
    return best


def decode_alone(files: list[bytes]) -> int:
    for data in files:
        Image.open(_bio(data)).convert("RGB").load()
    return len(files)


def _bio(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def sample_work(files: list[bytes], normalise: bool) -> int:
    """cratemae's per-sample work, as its loader does it (`cratemae.data.dataset`)."""
    tf = pretrain_transform(SIZE)
    for i, data in enumerate(files):
        x = crop_sample(open_image(data), tf, np.random.default_rng(i))
        if normalise:
            normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return len(files)


def torchvision_loader(folder: Path, workers: int) -> tuple[float, float]:
    """(images/s from the first batch on, images per CPU-second over the whole run) of
    ImageFolder + DataLoader with MAE's transform."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=tf), batch_size=BATCH, shuffle=True,
        num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(0))
    images, t_first, c0 = 0, 0.0, cpu_seconds()
    for i, (x, _) in enumerate(loader):
        if i == 0:
            t_first = time.perf_counter()
        else:
            images += len(x)
    wall = time.perf_counter() - t_first  # the workers are joined at the last batch
    return images / wall, (images + BATCH) / (cpu_seconds() - c0)


def cratemae_loader(shards: Path, workers: int, batches: int) -> tuple[float, float]:
    data = DataSection(train=str(shards), batch_size=BATCH)
    r = bench_data(data, SIZE, workers, batches)
    return r["images_per_s"], r["batches"] * BATCH / (r["cpu_cores_used"] * r["seconds"])


def breakdown(shards: Path, n: int, loader_rate: float) -> dict[str, float]:
    """Milliseconds per image of each part of the loader's work, in this process."""

    source = resolve_source(str(shards), "train")
    t0 = time.perf_counter()
    raws = [s for sh in source.shards for s in iter_shard(sh)][:n]
    files = [image_bytes(r) for r in raws]
    t_read = time.perf_counter() - t0
    tf = pretrain_transform(SIZE)
    t0 = time.perf_counter()
    for i, data in enumerate(files):  # the decode alone, with the box the crop will take
        img = open_image(data)
        draft_rgb(img, tf.box(*img.size, np.random.default_rng(i))[0], SIZE)
    t_dec = time.perf_counter() - t0
    batch = np.empty((BATCH, SIZE, SIZE, 3), dtype=np.uint8)  # private memory, reused
    t0 = time.perf_counter()
    for i, data in enumerate(files):  # what a worker does per image: decode, crop into its slot
        crop_into(open_image(data), tf, np.random.default_rng(i), batch[i % BATCH])
    t_crop = time.perf_counter() - t0 - t_dec
    pixels, warm = torch.from_numpy(batch), torch.empty_like(torch.from_numpy(batch))
    t_shm = t_warm = 0.0
    for _ in range(0, len(files), BATCH):
        t0 = time.perf_counter()
        empty = torch.empty(0, dtype=torch.uint8)  # a worker's `new_pixels`: a fresh segment
        shared = empty.new(empty._typed_storage()._new_shared(pixels.numel()))
        shared.copy_(pixels.flatten())  # its first touch: a page fault per 4 KB
        t1 = time.perf_counter()
        warm.copy_(pixels)  # the same copy into memory already mapped
        t_warm += time.perf_counter() - t1
        t_shm += t1 - t0
    parts = {"reading the shards": t_read, "decoding (at reduced scale)": t_dec,
             "cropping, resizing, into the batch": t_crop,
             "shared-memory segment (open, faults)": t_shm - t_warm}
    ms = {k: 1000 * v / len(files) for k, v in parts.items()}
    ms["queue, pickling, scheduling, rest"] = 1000 / loader_rate - sum(ms.values())
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None,
                    help="Folder to build (once) and keep the JPEGs in; default: a temp dir.")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2,
                    help="Best of R for every row (the loaders: their runs interleaved).")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per pipeline: the comparison is per worker
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cratemae-data-path-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder, shards = build_images(args.work, args.images)
    print(f"{args.images} JPEGs in {folder} and {shards} ({time.perf_counter() - t0:.0f}s)")
    files = [p.read_bytes() for p in sorted(folder.glob("*/*.jpg"))]
    batches = args.images // BATCH
    rows = [("JPEG decode alone (Pillow, full size), one core", rate(
                lambda: decode_alone(files), args.repeats), None),
            ("cratemae per-sample work (decode + crop to uint8), one core", rate(
                lambda: sample_work(files, False), args.repeats), None),
            ("cratemae per-sample work + normalise to float, one core", rate(
                lambda: sample_work(files, True), args.repeats), None)]
    loader_1w = (0.0, 0.0)
    for workers in (1, 2):  # best of R too, each loader run in turn with the other
        runs = [(torchvision_loader(folder, workers), cratemae_loader(shards, workers, batches))
                for _ in range(args.repeats)]
        tv, cm = max(r[0] for r in runs), max(r[1] for r in runs)
        loader_1w = loader_1w if workers > 1 else cm
        rows.append((f"torchvision ImageFolder + DataLoader, {workers} worker(s)", tv, None))
        rows.append((f"cratemae loader (bench-data), {workers} worker(s)", cm,
                     (cm[0] / tv[0], cm[1] / tv[1])))
    print("\n| pipeline | images/s | per worker vs torchvision | images per CPU-second "
          "| vs torchvision |\n| --- | --- | --- | --- | --- |")
    for name, (r, c), ratio in rows:
        vs = ("", "") if ratio is None else (f"{ratio[0]:.2f}x", f"{ratio[1]:.2f}x")
        print(f"| {name} | {r:,.0f} | {vs[0]} | {c:,.0f} | {vs[1]} |")
    (w1, c1), (ws, cs) = loader_1w, rows[1][1]
    print(f"\nloader at 1 worker / its per-sample work: {w1 / ws:.0%} in images/s, "
          f"{c1 / cs:.0%} in images per CPU-second")
    print("\nwhere the 1-worker loader's time per image goes (ms; parts timed in one process):")
    for k, v in breakdown(shards, args.images, loader_1w[0]).items():
        print(f"  {k:34s} {v:6.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
