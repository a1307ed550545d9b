"""`build_data`: a split is resolved and counted once per run, its epoch length comes from
the plan in every mode, each epoch's loader yields what `build_loader` did, and the
positions of yielded samples come from the plan's own dealing (checked against the rule
evaluation used before, kept here as the reference)."""

from __future__ import annotations

import pytest
from data_fixtures import data_section, make_shards

import cratemae.data.loader as loader_mod
from cratemae.data import Loader, build_data, build_loader, pretrain_transform
from cratemae.data.dataset import EpochDataset, ReadConfig
from cratemae.data.plan import make_plan
from cratemae.data.sources import resolve_source
from cratemae.errors import BadInputError
from cratemae.eval.classify import sample_positions

UNEVEN = [7, 13, 5, 11, 9, 20, 3, 12, 4, 6]  # 90 samples in 10 uneven shards
TRAIN = {"split": "train", "augment": "crop", "img_size": 8, "seed": 3}
# Evaluation plans: every sample, fixed order (the train split read as evaluation reads val).
EVAL = {"split": "train", "augment": "none", "img_size": 8, "seed": 0}


@pytest.fixture
def shard_dir(tmp_path):
    make_shards(tmp_path / "shards", UNEVEN)
    return tmp_path / "shards"


@pytest.fixture
def unindexed(tmp_path):
    """The same shards without shards.json: counted by reading, or dealt with epoch_samples."""
    make_shards(tmp_path / "raw", UNEVEN, index=False)
    return tmp_path / "raw"


def _labels(loader: Loader) -> list[int]:
    """Labels in yield order, read in-process (the streams visited round-robin as the
    DataLoader's workers are), so no worker processes are started."""
    return [int(y) for b in loader.dataset for y in b.labels]


def _old_positions(loader: Loader) -> list[int]:
    """The rule eval/classify.py used before the plan knew it: batch b from stream b % S."""
    plan = loader.plan
    starts, total = [], 0
    for shard in loader.source.shards:
        starts.append(total)
        total += int(shard.count or 0)
    runs = [[starts[s] + i for s, lo, hi in spec.segments for i in range(lo, hi)]
            for spec in plan.streams]
    taken, out = [0] * len(runs), []
    for b in range(plan.num_batches):
        s, n = b % len(runs), plan.batch_len(b)
        out.extend(runs[s][taken[s]:taken[s] + n])
        taken[s] += n
    return out


def test_one_resolve_and_count_for_three_epochs(unindexed, monkeypatch):
    calls = {"resolve": 0, "count": 0, "loader": 0}

    def counting(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    class CountingLoader(Loader):
        def __init__(self, *a, **kw):
            calls["loader"] += 1
            super().__init__(*a, **kw)

    for name, attr in (("resolve", "resolve_source"), ("count", "fill_counts")):
        monkeypatch.setattr(loader_mod, attr, counting(name, getattr(loader_mod, attr)))
    monkeypatch.setattr(loader_mod, "Loader", CountingLoader)
    data = data_section(str(unindexed), num_workers=2)
    split = build_data(data, **TRAIN, rank=1, world_size=2)
    assert calls == {"resolve": 1, "count": 1, "loader": 0}
    assert split.batches_per_epoch == 90 // (2 * 4)
    loaders = [split.loader(e) for e in range(3)]
    assert calls == {"resolve": 1, "count": 1, "loader": 3}
    assert all(isinstance(x, CountingLoader) for x in loaders)


def _old_loader(data, epoch: int, start: int, rank: int, world: int) -> Loader:
    """What build_loader built for pre-training before `build_data` (the reference): the
    source resolved, the epoch planned and the loader assembled, all in one call."""
    source = resolve_source(data.train, "train")
    plan = make_plan(source, split="train", batch_size=data.batch_size,
                     num_streams=max(1, data.num_workers), training=True,
                     resampled=data.resampled, epoch_samples=data.epoch_samples,
                     seed=TRAIN["seed"], epoch=epoch, rank=rank, world=world)
    cfg = ReadConfig(transform=pretrain_transform(8, data.crop_scale, data.mean, data.std),
                     labelled=True, gpu=False, seed=TRAIN["seed"], epoch=epoch, rank=rank,
                     shuffle_buffer=data.shuffle_buffer)
    return Loader(EpochDataset(source.shards, plan, cfg, start), plan, source, data, start)


@pytest.mark.parametrize("start", [0, 5])
def test_each_epoch_yields_what_the_old_loader_yielded(shard_dir, start):
    data = data_section(str(shard_dir), num_workers=2)
    split = build_data(data, **TRAIN, rank=0, world_size=2)
    for epoch in range(3):
        got, want = split.loader(epoch, start_batch=start), _old_loader(data, epoch, start, 0, 2)
        assert got.plan == want.plan and len(got) == len(want)
        assert _labels(got) == _labels(want)
        one = build_loader(data, **TRAIN, epoch=epoch, start_batch=start, world_size=2)
        assert _labels(one) == _labels(want)


def _modes(shard_dir, unindexed) -> dict:
    """(data section, build_data arguments) for every plan mode."""
    return {
        "exact-train": (data_section(str(shard_dir)), TRAIN),
        "exact-eval": (data_section(str(shard_dir)), EVAL),
        "dealt": (data_section(str(unindexed), epoch_samples=70), TRAIN),
        "resampled": (data_section(str(shard_dir), resampled=True, epoch_samples=50), TRAIN),
        "resampled-counted": (data_section(str(shard_dir), resampled=True), TRAIN),
    }


@pytest.mark.parametrize("mode", ["exact-train", "exact-eval", "dealt", "resampled",
                                  "resampled-counted"])
def test_batches_per_epoch_is_every_epochs_length(shard_dir, unindexed, mode):
    section, kw = _modes(shard_dir, unindexed)[mode]
    expected = {"exact-train": "exact", "exact-eval": "exact"}.get(mode, mode.split("-")[0])
    for world in (1, 2, 3):
        for workers in (0, 1, 3):
            for batch in (2, 5):
                data = section.model_copy(update={"num_workers": workers, "batch_size": batch})
                for rank in range(world):
                    split = build_data(data, **kw, rank=rank, world_size=world)
                    assert split.plan(0).mode == expected
                    lengths = {len(split.loader(e)) for e in range(4)}
                    assert lengths == {split.batches_per_epoch}, (world, workers, batch, rank)
                    assert len(split.loader(2, start_batch=1)) == split.batches_per_epoch - 1


@pytest.mark.parametrize("mode", ["exact-train", "exact-eval", "dealt", "resampled"])
def test_batches_per_epoch_is_what_the_loader_yields(shard_dir, unindexed, mode):
    section, kw = _modes(shard_dir, unindexed)[mode]
    data = section.model_copy(update={"num_workers": 2, "batch_size": 3})
    split = build_data(data, **kw, rank=1, world_size=2)
    assert sum(1 for _ in split.loader(1).dataset) == split.batches_per_epoch


@pytest.mark.parametrize(("world", "workers", "batch"),
                         [(1, 0, 4), (1, 3, 4), (2, 2, 5), (3, 1, 7), (3, 3, 2), (4, 2, 6)])
def test_positions_follow_the_old_rule_and_the_labels(shard_dir, world, workers, batch):
    # make_shards labels sample j with j, its global position: the labels read are the truth.
    evaluation = data_section(str(shard_dir), num_workers=workers, batch_size=batch)
    training = evaluation.model_copy(update={"shuffle_buffer": 0})  # samples in plan order
    for data, kw in ((evaluation, EVAL), (training, TRAIN)):
        for rank in range(world):
            split = build_data(data, **kw, rank=rank, world_size=world)
            for epoch in (0, 1):
                loader = split.loader(epoch)
                positions = split.positions(epoch)
                assert positions == _old_positions(loader) == sample_positions(loader)
                assert positions == _labels(loader)


def test_positions_need_known_counts(shard_dir):
    data = data_section(str(shard_dir), resampled=True, epoch_samples=40)
    with pytest.raises(BadInputError, match="evaluation needs sample counts"):
        build_data(data, **TRAIN).positions()


def test_bad_data_fails_at_build_data(tmp_path, shard_dir):
    with pytest.raises(BadInputError, match=r"missing: shard file not found"):
        build_data(data_section(str(tmp_path / "missing")), **TRAIN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=r"no shards\.json, tar files or images"):
        build_data(data_section(str(tmp_path / "empty")), **TRAIN)
    (shard_dir / "shards.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"shards\.json: not a valid shards\.json"):
        build_data(data_section(str(shard_dir)), **TRAIN)
    (shard_dir / "shards.json").unlink()
    with pytest.raises(BadInputError, match=r"10 shards for 11 ranks x 3 workers"):
        build_data(data_section(str(shard_dir), num_workers=3), **TRAIN, world_size=11)
    with pytest.raises(BadInputError, match=r"start_batch 99 outside 0\.\.22"):
        build_data(data_section(str(shard_dir)), **TRAIN).loader(0, start_batch=99)
