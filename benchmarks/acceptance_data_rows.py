"""Rows 4 and 5 of the GPU acceptance run (`benchmarks/acceptance.py`): the data and the
features: the GPU JPEG decode against Pillow, and embed / probe / finetune on CUDA. The
helpers, the sizes and the rules of a row are `acceptance_rows`'s.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import acceptance_checks as C
from acceptance_rows import COMMON, TINY, Checks, cli, sets

# GPU decode vs Pillow, mean |difference| per image in levels of 255: nvJPEG and libjpeg-turbo
# round the IDCT and upsample chroma differently (+-1-2 levels on most pixels), and the device
# resize is not Pillow's (tests/test_data_gpu.py allows 0.05 of a std, ~3 levels).
PIXEL_TOL = 3.0
# embed on CUDA (fp32) vs the CPU: relative Frobenius error of the features; cuDNN runs the
# patch-embedding convolution in TF32 (~1e-3 relative). CPU vs CPU (rehearsal): the same code.
EMBED_TOL_CUDA, EMBED_TOL_CPU = 5e-3, 1e-6


# --- row 4: GPU JPEG decode against Pillow --------------------------------------------------
def row_4(work: Path, rehearse: bool) -> Checks:
    """JPEG shards written by `cratemae shard`, read back; each image cropped, resized and
    flipped by the device path (nvJPEG) and by the CPU path (Pillow) with the same boxes."""
    import numpy as np
    import torch
    from PIL import Image

    from cratemae.data import pretrain_transform
    from cratemae.data.batch import EncodedBatch

    n, size, img = (32, 64, 32) if rehearse else (256, 256, 224)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth random images, so JPEG is not all noise
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        folder = work / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
            folder / f"{i:04d}.jpg", quality=90)
    code = cli("shard", work / "src", work / "shards")
    blobs = [f.read() for t in sorted((work / "shards").glob("*.tar"))
             for f in _members(t, ".jpg")]
    checks = [C.exit_code_is("shard", code, 0),
              C.Check("JPEGs read back", C.PASS if len(blobs) == n else C.FAIL, str(len(blobs)),
                      str(n))]
    tf = pretrain_transform(img, (0.3, 1.0), mean, std)
    items = []
    for blob in blobs:
        box, flip = tf.box(size, size, rng)
        items.append(((blob, tuple(float(round(v)) for v in box), flip), 0))
    batch = EncodedBatch.pack(items, None, 0, {})
    start = time.perf_counter()
    pil = torch.stack([tf.crop(Image.open(io.BytesIO(b)).convert("RGB"),
                               tuple(int(v) for v in box), flip).float()
                       for (b, box, flip), _ in items])  # (N, 3, img, img) in 0..255
    pil_rate = n / (time.perf_counter() - start)
    device = "cpu" if rehearse else "cuda"
    _device_decode(batch, device, img, mean, std)  # warm-up (nvJPEG handle, kernels)
    start = time.perf_counter()
    dev = _device_decode(batch, device, img, mean, std)
    dev_rate = n / (time.perf_counter() - start)
    worst = float((dev - pil).abs().mean(dim=(1, 2, 3)).max())
    name = "CPU stand-in (libjpeg + device resize) vs Pillow" if rehearse else "nvJPEG vs Pillow"
    checks += [C.within(f"{name}, worst image mean |diff|", worst, PIXEL_TOL, " levels",
                        miss=C.FAIL),
               C.Check("images/s", C.PASS, f"Pillow {pil_rate:,.0f}, {device} "
                       f"{dev_rate:,.0f} ({n} at {size} px -> {img})")]
    if rehearse:
        checks.append(C.needs_cuda("nvJPEG", "gpu_decode_batch on the device"))
    return checks


def _members(path: Path, suffix: str):
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                yield tar.extractfile(member)


def _device_decode(batch, device: str, img: int, mean, std):
    """(N, 3, img, img) float in 0..255, on the CPU: gpu_decode_batch on CUDA; on the CPU its
    steps with torchvision's CPU decoder (the rehearsal's stand-in: everything but nvJPEG)."""
    import torch

    from cratemae.data import gpu_decode_batch
    from cratemae.data.gpu import _crop_resize, _decode

    if device == "cuda":
        out = gpu_decode_batch(batch, "cuda", img_size=img, mean=mean, std=std).images
        torch.cuda.synchronize()
        if out.dtype == torch.uint8:  # 0..255, normalised later by the batch
            return out.cpu().float()
        m, s = (torch.tensor(v).view(3, 1, 1) for v in (mean, std))
        return (out.cpu() * s + m) * 255  # normalised -> 0..255
    offs = batch.offsets.tolist()
    images = _decode([batch.data[offs[i]:offs[i + 1]] for i in range(len(batch))],
                     torch.device("cpu"))
    out = torch.stack([_crop_resize(x, batch.boxes[i].tolist(), img)
                       for i, x in enumerate(images)])  # (N, 3, img, img)
    return torch.where(batch.flips.view(-1, 1, 1, 1), out.flip(-1), out)


# --- row 5: embed, probe, finetune ----------------------------------------------------------
def row_5(work: Path, rehearse: bool) -> Checks:
    """A short pre-training, then `cratemae embed` of demo:val on CUDA and on the CPU, and
    `probe` and `finetune` of the checkpoint for a few steps on the run's device."""
    from cratemae.eval.embeddings import read_embeddings

    ckpt = work / "pretrain"
    sizes = TINY if rehearse else ["data.num_workers=4"]
    code = cli("pretrain", "demo", *sets(*sizes, *COMMON, "schedule.max_steps=4"),
               "--out", ckpt)
    checks = [C.exit_code_is("pretrain", code, 0)]
    here = "cpu" if rehearse else "cuda"
    # The rehearsal's images: 2 x 32 of the demo's val split would do, but reading 6,000
    # demo images is what costs; a 64-image folder of two classes (train and val) instead.
    data = _folder(work / "images", 32) if rehearse else None
    split = [str(data / "val")] if data else ["demo:val"]
    files = [work / f"first-{here}.st", work / "second-cpu.st"]  # two files, also on a CPU
    for device, path in zip((here, "cpu"), files, strict=True):
        code = cli("embed", *split, "--checkpoint", ckpt, "--out", path,
                   "--device", device, "--precision", "fp32", "--workers", "0", "--overwrite")
        checks.append(C.exit_code_is(f"embed on {device}", code, 0))
    if all(c.status == C.PASS for c in checks):
        a, b = (read_embeddings(path)[0] for path in files)
        err = float((a - b).norm() / b.norm()) if a.shape == b.shape else float("inf")
        tol = EMBED_TOL_CPU if rehearse else EMBED_TOL_CUDA
        checks.append(C.within(f"features {here} vs cpu ({a.shape[0]} images), rel. err", err,
                               tol, miss=C.FAIL))
    if rehearse:
        checks.append(C.needs_cuda("embed on cuda", "the rehearsal compares CPU with CPU"))
    small = ([f'data.train="{data / "train"}"', f'data.val="{data / "val"}"',
              "data.num_workers=0", "data.batch_size=16"] if data else ["data.num_workers=4"])
    code = cli("probe", "probe/demo", "--checkpoint", ckpt, "--out", work / "probe",
               *sets(*small, "probe.max_iter=20", "probe.weight_decays=[1e-3]",
                     "run.loggers=[]"))
    checks.append(C.exit_code_is(f"probe on {here}", code, 0))
    code = cli("finetune", "finetune/demo", "--checkpoint", ckpt, "--out", work / "finetune",
               *sets(*small, "schedule.max_steps=3", "run.log_every=1", "run.loggers=[]"))
    checks.append(C.exit_code_is(f"finetune on {here}", code, 0))
    return checks


def _folder(root: Path, size: int, per_class: int = 16) -> Path:
    """train/ and val/ folders of two classes of smooth random PNG images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
                    root / split / cls / f"{i:03d}.png")
    return root
