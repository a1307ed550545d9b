"""The loader: exactly-once splitting over ranks and workers, equal batch counts, seeded
order, exact resume, sources (shard dirs, patterns, pipes, folders), and start-up errors."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from data_fixtures import (
    data_section,
    label_stream,
    make_shards,
    solid,
)

import cratemae.data.dataset as dataset_mod
from cratemae.data import Batch, build_loader
from cratemae.errors import BadInputError

UNEVEN = [7, 13, 5, 11, 9, 20, 3, 12, 4, 6]  # 90 samples in 10 uneven shards


def _loader(data, **kw):
    kw.setdefault("split", "train")
    kw.setdefault("augment", "crop")
    kw.setdefault("img_size", 8)
    kw.setdefault("seed", 0)
    kw.setdefault("epoch", 0)
    return build_loader(data, **kw)


@pytest.fixture
def shard_dir(tmp_path):
    make_shards(tmp_path / "shards", UNEVEN)
    return tmp_path / "shards"


def test_two_ranks_two_workers_see_each_sample_once(shard_dir):
    data = data_section(str(shard_dir), num_workers=2, batch_size=4)
    per_rank = [label_stream(_loader(data, rank=r, world_size=2)) for r in range(2)]
    loaders = [_loader(data, rank=r, world_size=2) for r in range(2)]
    # 90 samples, 2 ranks x batch 4: floor(90 / 8) = 11 batches per rank, 2 samples dropped
    assert [len(x) for x in loaders] == [11, 11]
    assert [x.num_samples for x in loaders] == [44, 44]
    assert [len(x) for x in per_rank] == [44, 44]
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == 88 and set(seen) <= set(range(90))


def test_full_coverage_when_divisible(tmp_path):
    make_shards(tmp_path / "d", [9, 3, 12, 8])  # 32 = 2 ranks x 2 workers x ... exactly
    data = data_section(str(tmp_path / "d"), num_workers=2, batch_size=4)
    seen = [y for r in range(2) for y in label_stream(_loader(data, rank=r, world_size=2))]
    assert sorted(seen) == list(range(32))


def test_eval_keeps_every_sample_and_equal_batches(shard_dir):
    data = data_section(str(shard_dir), val=str(shard_dir), num_workers=2, batch_size=8)
    # The dir's index has only a train split; the val pattern reads the tar files directly.
    data = data.model_copy(update={"val": str(shard_dir / "train-{000000..000009}.tar")})
    loaders = [_loader(data, split="val", augment="none", rank=r, world_size=4) for r in range(4)]
    labels = [label_stream(x) for x in loaders]
    assert len({len(x) for x in loaders}) == 1  # 23 samples per rank -> 3 batches each
    assert Counter(len(x) for x in labels) == {23: 4}
    counts = Counter(y for x in labels for y in x)
    assert set(counts) == set(range(90))
    assert sorted(counts.values()).count(2) == 2  # two ranks one short repeat one sample
    assert labels[0][:5] == [0, 1, 2, 3, 4]  # evaluation keeps the stored order


def test_seeded_order_is_reproducible_and_changes_with_epoch_and_seed(shard_dir):
    data = data_section(str(shard_dir), num_workers=0, batch_size=4)
    a = label_stream(_loader(data, seed=3, epoch=1))
    assert a == label_stream(_loader(data, seed=3, epoch=1))
    assert a != label_stream(_loader(data, seed=3, epoch=2))
    assert a != label_stream(_loader(data, seed=4, epoch=1))
    assert a != sorted(a)  # shuffled


def _by_label(loader) -> dict[int, torch.Tensor]:
    return {int(y): x for b in loader for x, y in zip(b.images, b.labels, strict=True)}


def test_augmentation_is_per_sample_not_per_worker(shard_dir):
    """A sample gets the same crop whatever the worker count, another one next epoch."""
    data = data_section(str(shard_dir), batch_size=4, crop_scale=(0.2, 0.3))
    runs = [
        _by_label(_loader(data.model_copy(update={"num_workers": w}), img_size=12)) for w in (0, 2)
    ]
    common = sorted(set(runs[0]) & set(runs[1]))
    assert len(common) > 40
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in common)
    later = _by_label(_loader(data, epoch=1, img_size=12))
    changed = [k for k in common if k in later and not torch.equal(runs[0][k], later[k])]
    assert len(changed) > 30  # the green ramp shows a different crop/flip


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_start_batch_equals_tail_of_full_epoch(shard_dir, workers):
    data = data_section(str(shard_dir), num_workers=workers, batch_size=4)
    full = list(_loader(data, augment="crop", epoch=5, rank=1, world_size=2))
    for k in (3, 4):
        tail = list(_loader(data, augment="crop", epoch=5, rank=1, world_size=2, start_batch=k))
        assert len(tail) == len(full) - k
        for a, b in zip(full[k:], tail, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_resume_does_not_decode_skipped_images(shard_dir, monkeypatch):
    calls = []
    real = dataset_mod.open_image
    monkeypatch.setattr(dataset_mod, "open_image", lambda *a: calls.append(1) or real(*a))
    data = data_section(str(shard_dir), num_workers=0, batch_size=4)
    loader = _loader(data, start_batch=8)  # 22 batches in all
    assert sum(len(b) for b in loader) == 14 * 4
    assert len(calls) == 14 * 4


def test_pretrain_batches_are_uint8_images_without_labels_normalised_on_demand(shard_dir):
    data = data_section(str(shard_dir), batch_size=4)
    batch = next(iter(_loader(data, augment="crop", labels=False, img_size=16)))
    assert isinstance(batch, Batch) and batch.labels is None and batch.bad == 0
    assert batch.images.shape == (4, 3, 16, 16) and batch.images.dtype == torch.uint8
    assert (batch.images[:, 2] == 77).all()  # solid images: blue is 77 everywhere
    x = batch.model_input("cpu")  # what the model sees: normalised float32
    want = (77 / 255 - 0.406) / 0.225
    assert x.dtype == torch.float32
    assert torch.allclose(x[:, 2], torch.full((4, 16, 16), want), atol=1e-5)


def test_too_few_shards_for_ranks_times_workers(shard_dir, caplog):
    """A tar has one reader: 10 shards on 4 ranks keep 2 workers each busy, not 3 (a
    warning says so); fewer shards than ranks is an error."""
    data = data_section(str(shard_dir), num_workers=3, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        loader = _loader(data, rank=0, world_size=4)
    assert loader.data.num_workers == 2 and len(loader.plan.streams) == 2
    assert "data.train: 10 shards for 4 rank(s): 2 of the 3 workers" in caplog.text
    with pytest.raises(BadInputError, match=r"10 shards for 11 ranks x 3 workers = 33 readers"):
        _loader(data, rank=0, world_size=11)
    resampled = data.model_copy(update={"resampled": True})
    assert len(_loader(resampled, rank=0, world_size=4)) == 90 // (4 * 2)


def test_finetune_loader_uses_the_recipe_policy(shard_dir):
    data = data_section(str(shard_dir), auto_augment="rand-n3-m5", re_prob=0.5)
    tf = _loader(data, augment="randaugment").dataset.cfg.transform.tf
    names = {type(t).__name__: t for t in tf.transforms}
    assert names["RandAugment"].num_layers == 3 and names["RandomErasing"].probability == 0.5
    bad = data.model_copy(update={"auto_augment": "bogus"})
    with pytest.raises(BadInputError, match=r"^data\.auto_augment: 'bogus' is not a timm"):
        _loader(bad, augment="randaugment")
    assert len(_loader(bad, augment="crop")) > 0  # only fine-tuning reads the policy


def test_missing_shard_file_names_its_path(shard_dir):
    (shard_dir / "train-000004.tar").unlink()
    with pytest.raises(BadInputError, match=r"train-000004\.tar: shard file not found"):
        _loader(data_section(str(shard_dir)))
    pattern = str(shard_dir / "train-{000000..000009}.tar")
    with pytest.raises(BadInputError, match=r"train-000004\.tar: shard file not found"):
        _loader(data_section(pattern))


def test_resampled_epoch_length_and_determinism(shard_dir):
    data = data_section(str(shard_dir), resampled=True, epoch_samples=40, num_workers=2)
    a = label_stream(_loader(data, rank=1, world_size=2))
    assert len(a) == 20 and a == label_stream(_loader(data, rank=1, world_size=2))


def test_pipe_urls_are_counted_by_one_pass_or_dealt_with_epoch_samples(shard_dir):
    pattern = f"pipe:cat {shard_dir}/train-{{000000..000009}}.tar"
    counted = _loader(data_section(pattern, batch_size=10))  # counts found by one pass
    assert counted.num_samples == 90 and sorted(label_stream(counted)) == list(range(90))
    data = data_section(pattern, epoch_samples=48, num_workers=2)
    loaders = [_loader(data, rank=r, world_size=2) for r in range(2)]
    labels = [label_stream(x) for x in loaders]
    assert [len(x) for x in loaders] == [6, 6] and [len(x) for x in labels] == [24, 24]
    assert len(set(labels[0]) | set(labels[1])) > 40  # dealt shards: mostly distinct samples


def test_tar_directory_without_index_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path / "cache"))
    make_shards(tmp_path / "d", [5, 6, 7], index=False)
    loader = _loader(data_section(str(tmp_path / "d"), batch_size=3))
    assert len(loader) == 6 and sorted(label_stream(loader)) == list(range(18))
    assert list((tmp_path / "cache" / "counts").glob("*.json"))  # cached for next time


def test_image_folders(tmp_path):
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(5):
            solid(10 * c + i).save(tmp_path / "tree" / name / f"{i}.png")
    data = data_section(str(tmp_path / "tree"), val=str(tmp_path / "tree"), batch_size=2)
    loader = _loader(data, split="val", augment="none")
    assert loader.classes == ("cat", "dog")
    assert sorted(label_stream(loader)) == [0] * 5 + [1] * 5
    (tmp_path / "flat").mkdir()
    for i in range(6):
        solid(i).save(tmp_path / "flat" / f"{i}.png")
    flat = data_section(str(tmp_path / "flat"), batch_size=3, num_workers=2)
    assert sum(len(b) for b in _loader(flat, augment="crop", labels=False)) == 6
    with pytest.raises(BadInputError, match=r"has no cls label"):
        list(_loader(flat, augment="crop"))
