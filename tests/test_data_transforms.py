"""The three transforms: shapes, seeded determinism, crop statistics, agreement with
torchvision's evaluation pipeline, and colour-mode conversion."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from data_fixtures import (
    encode,
    photo,
)
from PIL import Image
from torchvision.transforms import v2

from cratemae.data import eval_transform, finetune_transform, pretrain_transform
from cratemae.data.decode import BadSample, load_rgb, open_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(photo("astronaut"))  # 512 x 512 RGB


def test_pretrain_transform_is_seeded_and_varies(astronaut):
    tf = pretrain_transform(64, (0.2, 1.0), MEAN, STD)
    a = tf(astronaut, np.random.default_rng(1))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, tf(astronaut, np.random.default_rng(1)))
    assert not torch.equal(a, tf(astronaut, np.random.default_rng(2)))


def test_random_crop_box_statistics():
    tf = pretrain_transform(32, (0.2, 0.5))
    rng = np.random.default_rng(0)
    draws = [tf.box(400, 300, rng) for _ in range(2000)]
    areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (400 * 300) for b, _ in draws])
    ratios = np.array([(b[2] - b[0]) / (b[3] - b[1]) for b, _ in draws])
    assert areas.min() > 0.19 and areas.max() < 0.51
    assert ratios.min() > 0.74 and ratios.max() < 1.35
    assert all(0 <= b[0] < b[2] <= 400 and 0 <= b[1] < b[3] <= 300 for b, _ in draws)
    assert 0.45 < np.mean([f for _, f in draws]) < 0.55  # flips half the time


def test_eval_transform_matches_torchvision(astronaut):
    img = astronaut.crop((3, 40, 512, 440))  # 509 x 400: a non-square image
    ours = eval_transform(224, MEAN, STD)(img, np.random.default_rng(0))
    ref = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    # the same pixels, up to a rounding step of 1/255 here and there
    assert (ours - ref).abs().mean() < 1e-3 and (ours - ref).abs().max() < 0.05
    assert torch.equal(ours, eval_transform(224, MEAN, STD)(img, np.random.default_rng(5)))


def test_finetune_transform_is_seeded_and_keeps_global_rngs(astronaut):
    tf = finetune_transform(64, MEAN, STD)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    a = tf(astronaut, np.random.default_rng(3))
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())
    b = tf(astronaut, np.random.default_rng(3))
    assert a.pixels.shape == (3, 64, 64) and a.pixels.dtype == torch.uint8
    assert torch.equal(a.pixels, b.pixels)
    assert (a.erase is None) == (b.erase is None)
    assert a.erase is None or (a.erase[:2] == b.erase[:2] and a.erase[2].equal(b.erase[2]))
    assert not torch.equal(a.pixels, tf(astronaut, np.random.default_rng(4)).pixels)


def test_finetune_policy_and_erasing_are_chosen(astronaut):
    def parts(tf):
        return {type(t).__name__: t for t in tf.tf.transforms}

    default = parts(finetune_transform(32, MEAN, STD))
    assert default["RandAugment"].num_layers == 2  # MAE's rand-m9-mstd0.5-inc1
    assert {op.magnitude for op in default["RandAugment"].ops} == {9}
    assert default["RandomErasing"].probability == 0.25
    chosen = parts(finetune_transform(32, MEAN, STD, auto_augment="rand-n3-m14", re_prob=0.0))
    assert chosen["RandAugment"].num_layers == 3
    assert {op.magnitude for op in chosen["RandAugment"].ops} == {14}
    assert "RandomErasing" not in chosen
    assert "AutoAugment" in parts(finetune_transform(32, MEAN, STD, auto_augment="original"))
    with pytest.raises(ValueError, match=r"'rand-q3' is not a timm augmentation policy"):
        finetune_transform(32, MEAN, STD, auto_augment="rand-q3")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG")]
)
def test_colour_modes_become_rgb(astronaut, mode, fmt):
    data = encode(astronaut.convert(mode), fmt)
    rgb = load_rgb(open_image(data))
    assert rgb.mode == "RGB" and rgb.size == (512, 512)
    if mode in ("RGBA", "P", "L"):  # lossless modes: exactly what PIL's own conversion gives
        assert np.array_equal(np.asarray(rgb), np.asarray(astronaut.convert(mode).convert("RGB")))


def test_sixteen_bit_greyscale_is_scaled():
    arr = photo("camera").astype(np.uint16) * 257  # 16-bit PNG
    rgb = load_rgb(open_image(encode(Image.fromarray(arr))))
    assert (
        rgb.mode == "RGB"
        and np.abs(np.asarray(rgb)[..., 0].astype(int) - photo("camera")).max() <= 1
    )


def test_jpeg_draft_decodes_small_but_close(astronaut):
    data = encode(astronaut, "JPEG", quality=95)
    small = load_rgb(open_image(data), draft=(128, 128))
    assert small.size == (128, 128)
    with pytest.raises(BadSample, match=r"zero-byte|not an image"):
        open_image(b"")


def test_finetune_survives_posterize_to_zero_bits(astronaut):
    """RandAugment 'inc1' posterize can ask for 0 bits, which recent Pillow refuses."""
    from cratemae.data.transforms import _posterize_any_bits

    assert np.asarray(_posterize_any_bits(astronaut, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize_any_bits(astronaut, 8)), np.asarray(astronaut))
    tf = finetune_transform(32, MEAN, STD)
    small = astronaut.resize((48, 48))
    outs = [tf(small, np.random.default_rng(i)) for i in range(200)]  # hits posterize often
    assert all(o.pixels.shape == (3, 32, 32) and o.pixels.dtype == torch.uint8 for o in outs)
