"""The CPU data path: uint8 batches normalised where the model runs, the same figures as the
old per-sample normalisation; reduced-scale decoding within its tolerance; the workers a
rate needs, and the figures recorded for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import data_section, encode, make_shards, photo
from PIL import Image

from cratemae.bench.data import data_key, model_key, record_rate, recorded_rate
from cratemae.data.batch import model_input
from cratemae.data.dataset import collate_images, crop_sample
from cratemae.data.decode import load_rgb, open_image
from cratemae.data.loader import build_loader
from cratemae.data.plan import workers_needed
from cratemae.data.transforms import eval_transform, pretrain_transform
from cratemae.train.recorder import data_wait_hint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _old_normalise(x: torch.Tensor) -> torch.Tensor:
    """What the workers sent before: (x / 255 - mean) / std, in float32, per batch."""
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(photo("coffee"))  # 600 x 400


def _jpeg(img: Image.Image, w: int, h: int) -> bytes:
    return encode(img.resize((w, h), Image.Resampling.BICUBIC), "JPEG", quality=90)


def test_uint8_to_model_input_is_the_old_per_sample_path_to_float32_rounding(coffee):
    """Same image, same seeds: the old path (crop to uint8, normalise per batch in the worker)
    and the new one (crop view, uint8 batch, `model_input`) give the same floats. At 160 px
    no box is twice the output, so both decode at full size."""
    jpeg, tf = _jpeg(coffee, 300, 200), pretrain_transform(160, mean=MEAN, std=STD)
    old, new = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        img = open_image(jpeg)
        box, flip = tf.box(*img.size, rng)
        old.append(tf.crop(load_rgb(img), box, flip))
        new.append(crop_sample(open_image(jpeg), tf, np.random.default_rng(seed)))
    assert any(tf.box(300, 200, np.random.default_rng(s))[1] for s in range(6))  # a flip too
    batch = collate_images(new)  # uint8 (B, 3, S, S)
    assert batch.dtype == torch.uint8 and torch.equal(batch, torch.stack(old))
    x = model_input(batch, "cpu", MEAN, STD)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert (x - _old_normalise(torch.stack(old))).abs().max() <= 1e-6


def _timm_whole(tf, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    """timm's whole fine-tuning transform (crop .. ToTensor, Normalize, erasing) under the
    seeds `TimmTransform` gives it: the float image a worker sent before."""
    import random

    seed = int(rng.integers(0, 2**32))
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return tf.tf(img)


@pytest.mark.parametrize("re_prob", [0.25, 1.0, 0.0])
def test_randaugment_uint8_and_erasing_on_the_device_are_timms_whole_transform(coffee,
                                                                              re_prob):
    """Fine-tuning: uint8 pixels from the worker and timm's random erasing applied after the
    normalisation (`model_input`) give what timm's whole transform gave, seed for seed: to
    float32 rounding, and the erased pixels exactly."""
    from cratemae.data.batch import Erasures
    from cratemae.data.transforms import finetune_transform

    tf = finetune_transform(48, MEAN, STD, re_prob=re_prob)
    img = coffee.resize((120, 80))
    old = torch.stack([_timm_whole(tf, img, np.random.default_rng(s)) for s in range(12)])
    new = [tf(img, np.random.default_rng(s)) for s in range(12)]
    erases = [a.erase for a in new]
    x = model_input(collate_images([a.pixels for a in new]), "cpu", MEAN, STD,
                    Erasures.pack(erases))
    assert x.shape == old.shape and (x - old).abs().max() <= 1e-6
    erased = torch.zeros(old.shape, dtype=torch.bool)
    for i, e in enumerate(erases):
        if e is not None:
            top, left, noise = e
            erased[i, :, top:top + noise.shape[1], left:left + noise.shape[2]] = True
    assert torch.equal(x[erased], old[erased])
    drawn = sum(e is not None for e in erases)
    assert drawn == (12 if re_prob == 1.0 else 0 if re_prob == 0.0 else drawn) and (
        re_prob != 0.25 or 0 < drawn < 12)


def test_finetuning_batches_are_uint8_with_their_erasing_in_process_and_in_a_worker(tmp_path):
    make_shards(tmp_path / "d", [8] * 4, size=24)
    kw = dict(split="train", augment="randaugment", labels=True, img_size=16, seed=3, epoch=0)
    got = {}
    for workers in (0, 1):
        data = data_section(str(tmp_path / "d"), num_workers=workers, re_prob=1.0)
        got[workers] = list(build_loader(data, **kw))
    for a, b in zip(got[0], got[1], strict=True):
        assert a.images.dtype == b.images.dtype == torch.uint8
        assert b.erase is not None and len(b.erase.boxes) == len(b)  # re_prob 1: every one
        assert torch.equal(a.model_input("cpu"), b.model_input("cpu"))


def test_loader_batches_are_channels_last_uint8_alike_in_process_and_in_a_worker(tmp_path):
    make_shards(tmp_path / "d", [8] * 4, size=24)
    kw = dict(split="train", augment="crop", labels=False, img_size=16, seed=3, epoch=0)
    got = {}
    for workers in (0, 1):
        data = data_section(str(tmp_path / "d"), num_workers=workers)
        got[workers] = list(build_loader(data, **kw))
    for a, b in zip(got[0], got[1], strict=True):
        assert a.images.dtype == b.images.dtype == torch.uint8
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.images, b.images)
        x = b.model_input("cpu")
        assert x.is_contiguous() and torch.equal(x, a.model_input("cpu"))
        assert (x - _old_normalise(b.images)).abs().max() <= 1e-6


def test_reduced_scale_decoding_stays_within_its_tolerance(coffee):
    """A box at least twice the output is decoded at 1/2, 1/4 or 1/8 scale (`draft_rgb`):
    per image the mean absolute difference from the exact transform (full decode, bicubic) is
    at most 4 of 255 levels, and at most 2 on average (measured: 1.5 and 3.7 at worst on the
    benchmark's 200 photographs)."""
    data = _jpeg(coffee, 500, 375)
    tf = pretrain_transform(64, mean=MEAN, std=STD)
    means = []
    for seed in range(8):
        fast = crop_sample(open_image(data), tf, np.random.default_rng(seed)).float()
        rng, full = np.random.default_rng(seed), open_image(data)
        box, flip = tf.box(*full.size, rng)
        assert min(box[2] - box[0], box[3] - box[1]) >= 2 * 64  # reduced scale applies
        exact = tf.crop(load_rgb(full), box, flip).float()
        means.append(float((fast - exact).abs().mean()))
    assert max(means) <= 4 and np.mean(means) <= 2, means
    assert max(means) > 0  # it did decode at reduced scale


@pytest.mark.parametrize(("rate", "per_worker", "need"),
                         [(1000, 250, 4), (1001, 250, 5), (1, 250, 1), (750.0, 250.0, 3)])
def test_workers_needed(rate, per_worker, need):
    assert workers_needed(rate, per_worker) == need


@pytest.mark.parametrize("bad", [(0, 10), (10, 0), (-1, 10), (float("nan"), 1), (1, float("inf"))])
def test_workers_needed_refuses_rates_that_are_no_rates(bad):
    with pytest.raises(ValueError, match="above 0"):
        workers_needed(*bad)


def test_data_wait_hint_names_the_workers_that_would_remove_the_wait():
    assert data_wait_hint(0.10, 8) == ""  # at most 10%: nothing to say
    # 35% waiting with 8 workers: the model could take 8 / 0.65 = 12.3 workers' images
    assert data_wait_hint(0.35, 8).startswith(" (5 more workers per rank, or data.decode")
    assert data_wait_hint(0.2, 1).startswith(" (1 more worker per rank,")
    # in the main process loading and computing alternate: one worker loading 4x the compute
    assert data_wait_hint(0.8, 0).startswith(" (data.num_workers = 4,")
    assert "data.decode" not in data_wait_hint(0.5, 2, gpu_decode=True)


def test_recorded_rates_round_trip_and_an_unreadable_record_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path / "cache"))
    key = data_key(data_section("/data/in1k"), 224, "pretrain")
    assert recorded_rate(key) is None
    assert record_rate(key, 250.0) and recorded_rate(key) == 250.0
    other = model_key("crate_mae_base", 224, "cpu")
    assert record_rate(other, 3000) and recorded_rate(key) == 250.0
    assert recorded_rate(other) == 3000.0
    (tmp_path / "cache" / "bench-records.json").write_text("{not json")
    assert recorded_rate(key) is None
    assert record_rate(key, 100.0) and recorded_rate(key) == 100.0  # replaced whole


def _direct_batch(chunk, tf):
    """`EpochDataset._batch` on raw samples: crops written straight into the batch."""
    from cratemae.data.dataset import EpochDataset, ReadConfig
    from cratemae.data.decode import BadLog

    cfg = ReadConfig(transform=tf, labelled=True, shuffle_buffer=0, seed=5, epoch=0, rank=0)
    return EpochDataset((), None, cfg)._batch(chunk, BadLog())  # type: ignore[arg-type]


@pytest.mark.parametrize("transform", [pretrain_transform, eval_transform], ids=["crop", "none"])
def test_crops_written_into_the_batch_are_the_per_sample_crops_bad_slots_repeats(
        coffee, transform):
    """Each crop goes straight into its slot of the batch (`crop_into`): the pixels are
    those of `crop_sample` + `collate_images` with the same seeds, a bad sample's slot holds
    the repeat of a good one (in order, labels too), and an all-bad batch is zeros."""
    from cratemae.data.dataset import TAG_SAMPLE, _key_hash
    from cratemae.data.shards import RawSample

    tf = transform(48, mean=MEAN, std=STD)
    jpegs = [_jpeg(coffee, 120 + 10 * i, 90) for i in range(3)]
    raws = [RawSample("s.tar", f"k{i}", {"jpg": j, "cls": b"%d" % i}) for i, j in enumerate(jpegs)]
    broken = RawSample("s.tar", "bad", {"jpg": b"not a JPEG", "cls": b"9"})
    chunk = [raws[0], broken, raws[1], raws[2], broken, broken]
    ref = [crop_sample(open_image(r.parts["jpg"]), tf,
                       np.random.default_rng([5, 0, TAG_SAMPLE, _key_hash(r)])) for r in raws]
    order = [0, 0, 1, 2, 1, 2]  # bad slots: the good samples again, in turn
    batch = _direct_batch(chunk, tf)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.images, collate_images([ref[i] for i in order]))
    assert batch.labels.tolist() == order and batch.bad == 3 and batch.bad_shards == {"s.tar": 3}
    none = _direct_batch([broken] * 2, tf)
    assert none.images.shape == (2, 3, 48, 48) and not none.images.any() and none.bad == 2
