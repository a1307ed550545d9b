"""GPU decoding: refuses clearly without CUDA; on a GPU, matches the CPU path's crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import (
    data_section,
    encode,
    make_shards,
    photo,
)

from cratemae.data import build_loader, gpu_decode_batch, pretrain_transform
from cratemae.data.batch import EncodedBatch
from cratemae.errors import BadInputError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _encoded_batch() -> tuple[EncodedBatch, list[np.ndarray], object]:
    """Three JPEG photos with random crop boxes and flips, as the loader would send them."""
    tf = pretrain_transform(64, (0.3, 1.0), MEAN, STD)
    rng = np.random.default_rng(0)
    items, arrays = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        arr = photo(name)
        data = encode(arr, "JPEG", quality=95)
        box, flip = tf.box(arr.shape[1], arr.shape[0], rng)
        items.append(((data, box, flip), 0))
        arrays.append(arr)
    return EncodedBatch.pack(items, None, 0, {}), arrays, tf


def test_gpu_decode_refuses_a_cpu_device():
    batch, _, _ = _encoded_batch()
    with pytest.raises(BadInputError, match="needs a CUDA device"):
        gpu_decode_batch(batch, "cpu", img_size=64)


def test_gpu_decode_option_without_cuda_is_a_bad_input(tmp_path):
    make_shards(tmp_path / "d", [8, 8])
    data = data_section(str(tmp_path / "d"), decode="gpu")
    kw = dict(split="train", augment="crop", labels=False, img_size=16, seed=0, epoch=0)
    if torch.cuda.is_available():
        batch = next(iter(build_loader(data, **kw)))
        assert isinstance(batch, EncodedBatch) and len(batch) == 4
    else:
        with pytest.raises(BadInputError, match="needs CUDA"):
            build_loader(data, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_cpu_path():
    from io import BytesIO

    from PIL import Image

    batch, arrays, tf = _encoded_batch()
    out = gpu_decode_batch(batch, "cuda", img_size=64, mean=MEAN, std=STD)
    assert out.images.shape == (3, 3, 64, 64) and out.images.device.type == "cuda"
    assert out.images.dtype == torch.uint8  # as the CPU path delivers; normalised on demand
    for i in range(len(arrays)):
        offs = batch.offsets.tolist()
        img = Image.open(BytesIO(batch.data[offs[i] : offs[i + 1]].numpy().tobytes()))
        box = tuple(round(v) for v in batch.boxes[i].tolist())
        cpu = tf.crop(img.convert("RGB"), box, bool(batch.flips[i]))
        cpu = (cpu.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(
            3, 1, 1
        )
        diff = (out.model_input("cuda")[i].cpu() - cpu).abs()
        assert diff.mean() < 0.05, (i, diff.mean())  # decoders and resamplers differ slightly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_replaces_undecodable_jpegs(tmp_path):
    batch, _, _ = _encoded_batch()
    offs = batch.offsets.tolist()
    batch.data[offs[1] + 600 : offs[2]] = 0  # wreck the second JPEG's entropy data
    out = gpu_decode_batch(batch, "cuda", img_size=32)
    assert out.images.shape == (3, 3, 32, 32) and out.bad in (0, 1)  # nvJPEG may tolerate it
    assert torch.isfinite(out.model_input("cuda")).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io, since 0.29
def test_gpu_crop_resize_matches_pil_on_cpu_tensors():
    """The device-side crop + bicubic resize, run on CPU tensors, against the CPU path."""
    from io import BytesIO

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from cratemae.data.gpu import _crop_resize

    batch, arrays, tf = _encoded_batch()
    offs = batch.offsets.tolist()
    for i in range(len(arrays)):
        blob = batch.data[offs[i] : offs[i + 1]]
        box = batch.boxes[i].tolist()
        ours = _crop_resize(decode_jpeg(blob, mode=ImageReadMode.RGB), box, 64)  # (3, 64, 64)
        pil = Image.open(BytesIO(blob.numpy().tobytes())).convert("RGB")
        ref = tf.crop(pil, tuple(box), False).float()
        assert ours.shape == ref.shape and (ours - ref).abs().mean() < 1.0  # of 255
