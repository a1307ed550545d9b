"""Declared sample counts (`_info.json`, `shards.json`) are checked as the shards are read,
by one mechanism (`iter_shard`'s `Miscount`) that every reader goes through: a wrong count
is one error line naming the shard and both numbers where every sample is promised once
(`embed`, the probe's feature pass, validation), and a warning in training, whose epoch
keeps the plan's number of batches on every rank. No FIFO is opened as a shard."""

from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import data_section, make_shards, write_tar
from support import TINY_RUN, cli, launch
from test_embed import ckpt  # noqa: F401 - the tiny checkpoint fixture, reused

from cratemae.data import build_data
from cratemae.data.plan import make_plan
from cratemae.data.shards import Miscount, Shard, iter_shard
from cratemae.data.sources import resolve_source
from cratemae.errors import BadInputError
from cratemae.eval.classify import eval_batches
from cratemae.eval.validation import on_device, subset_loader, subset_positions
from cratemae.rundir import RunFiles


def wds(root: Path, held: list[int], declared: list[int], split: str = "validation",
        prefix: str = "val") -> Path:
    """Tars holding `held` samples each (`make_shards`' keys and labels), with an
    `_info.json` declaring `declared` of them."""
    paths = make_shards(root, held, prefix=prefix, index=False)
    split_info = {"num_samples": sum(declared), "filenames": [p.name for p in paths],
                  "shard_lengths": declared}
    (root / "_info.json").write_text(json.dumps({"splits": {split: split_info}}))
    return root


def _read(shard: Shard, lo: int = 0, hi: int | None = None, pad: bool = True
          ) -> tuple[list, list[Miscount]]:
    found: list[Miscount] = []
    return list(iter_shard(shard, lo, hi, on_miscount=found.append, pad=pad)), found


# --- the one check: iter_shard ---------------------------------------------------------
def test_a_piece_ending_at_the_declared_end_reads_on_and_reports(tmp_path):
    (tar,) = make_shards(tmp_path, [6], index=False)
    samples, found = _read(Shard(str(tar), 4), 2, 4)  # under-declared: 4 of 6
    assert [s.key for s in samples] == ["s0_2", "s0_3"]  # the piece only
    assert found == [Miscount(str(tar), 4, 6)]
    samples, found = _read(Shard(str(tar), 9), 3, 9)  # over-declared: 9, holds 6
    assert [s.missing is None for s in samples] == [True] * 3 + [False] * 3
    assert found == [Miscount(str(tar), 9, 6)]
    assert str(found[0]) == f"{tar}: declared 9 samples, read 6"
    samples, found = _read(Shard(str(tar), 9), 3, 9, pad=False)  # the reader refills
    assert len(samples) == 3 and found == [Miscount(str(tar), 9, 6)]
    assert _read(Shard(str(tar), 9), 7, 9)[1] == [Miscount(str(tar), 9, 6)]  # past its end
    assert _read(Shard(str(tar), 6), 0, 3)[1] == []  # right, and a piece short of the end
    assert _read(Shard(str(tar), 4), 0, 2)[1] == []  # wrong, but not read to the end: unseen
    assert _read(Shard(str(tar), 6), 3, 6)[1] == []


def test_the_samples_past_the_declared_end_are_counted_from_headers(tmp_path, monkeypatch):
    (tar,) = make_shards(tmp_path, [50], index=False)
    real, opened = tarfile.TarFile.extractfile, []
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, ti: opened.append(ti.name) or real(self, ti))
    assert _read(Shard(str(tar), 2), 0, 2)[1] == [Miscount(str(tar), 2, 50)]
    assert opened == ["s0_0.png", "s0_0.cls", "s0_1.png", "s0_1.cls"]


def test_empty_and_declared_empty_shards(tmp_path):
    (tar,) = make_shards(tmp_path, [3], index=False)
    assert _read(Shard(str(tar), 0), 0, 0) == ([], [Miscount(str(tar), 0, 3)])
    empty = write_tar(tmp_path / "empty.tar", [])
    samples, found = _read(Shard(str(empty), 2), 0, 2)
    assert found == [Miscount(str(empty), 2, 0)] and len(samples) == 2
    assert _read(Shard(str(empty), 0), 0, 0) == ([], [])


def test_a_truncated_tar_is_bad_samples_not_a_miscount(tmp_path):
    (tar,) = make_shards(tmp_path, [5], index=False)
    tar.write_bytes(tar.read_bytes()[: 512 * 7])  # cut inside the fourth sample
    samples, found = _read(Shard(str(tar), 5), 0, 5)
    assert found == [] and len(samples) == 5
    assert samples[-1].missing is not None and "unreadable" in samples[-1].missing


def test_a_fifo_is_refused_at_once_never_opened(tmp_path):
    fifo = tmp_path / "train-000000.tar"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            list(iter_shard(Shard(str(fifo), 3), 0, 3))
        except BaseException as err:  # handed to the test
            outcome.append(err)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the FIFO was opened and waited on")
    assert isinstance(outcome[0], BadInputError) and "is a FIFO" in str(outcome[0])


# --- evaluation: an error naming the shard and both numbers --------------------------------
def test_embed_refuses_a_wrong_count_in_one_line(ckpt, tmp_path):  # noqa: F811
    data = wds(tmp_path / "wds", [20, 5], [10, 5])  # today's main drops 10 samples silently
    out = tmp_path / "f.safetensors"
    run = cli("embed", data, "--checkpoint", ckpt, "--out", out, "--workers", "0",
              "--batch-size", "8")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.exit_code == 2 and not out.exists(), run.output
    assert len(errors) == 1 and run.stderr.strip().endswith(errors[0]), run.stderr
    assert "val-000000.tar: declared 10 samples, read 20" in errors[0]


def test_right_counts_and_a_declared_empty_shard_pass_evaluation(tmp_path):
    data = data_section(None, val=str(wds(tmp_path / "wds", [4, 0, 3], [4, 0, 3])))
    assert sum(len(b) for b, _ in eval_batches(data, "val", 8)) == 7
    (tmp_path / "wds" / "val-000001.tar").unlink()
    make_shards(tmp_path / "holds", [2], prefix="val", index=False)[0].rename(
        tmp_path / "wds" / "val-000001.tar")  # declared 0, holds 2
    with pytest.raises(BadInputError, match=r"val-000001\.tar: declared 0 samples, read 2"):
        list(eval_batches(data, "val", 8))


@pytest.mark.parametrize(("workers", "declared"), [(0, 3), (2, 8)], ids=["under", "over"])
def test_the_feature_pass_refuses_a_wrong_count(tmp_path, workers, declared):
    data = data_section(None, val=str(wds(tmp_path / "wds", [9, 6], [9, declared])),
                        num_workers=workers)
    got = []
    with pytest.raises(BadInputError, match=rf"val-000001\.tar: declared {declared} samples, "
                                            "read 6"):
        for batch, _ in eval_batches(data, "val", 8):
            got.append(len(batch))
    assert sum(got) == 9 + declared  # every batch was read: the check ends the pass


def test_validation_refuses_a_wrong_count(tmp_path):
    data = data_section(None, val=str(wds(tmp_path / "wds", [4, 8], [4, 5])))
    source = resolve_source(data.val, "val")
    loader = subset_loader(source, subset_positions(9, 9, 0, "val"), data, img_size=8,
                           labelled=True, seed=0, device="cpu")
    with pytest.raises(BadInputError, match=r"val-000001\.tar: declared 5 samples, read 8"):
        list(on_device(loader, "cpu"))
    right = subset_loader(source, np.arange(4), data, img_size=8, labelled=True, seed=0,
                          device="cpu")
    assert len(list(on_device(right, "cpu"))) == 1  # the wrong shard was not read


# --- training: a warning, and the plan's steps on every rank -----------------------------
TRAIN = dict(split="train", augment="crop", img_size=8, seed=1, labels=False)


def _train(root: Path, rank: int = 0, world: int = 1, **kw):
    data = data_section(str(root), batch_size=4, **kw)
    return build_data(data, rank=rank, world_size=world, **TRAIN)


@pytest.mark.parametrize("held", [[8, 2, 8, 8], [8, 14, 8, 8]], ids=["short", "long"])
def test_a_training_epoch_warns_and_keeps_the_plans_steps_on_every_rank(tmp_path, caplog,
                                                                         held):
    root = wds(tmp_path / "wds", held, [8, 8, 8, 8], split="train", prefix="train")
    for rank in (0, 1):
        split = _train(root, rank, 2, num_workers=1)
        with caplog.at_level(logging.WARNING, logger="cratemae.data"):
            batches = list(split.loader(epoch=0))
        assert len(batches) == split.batches_per_epoch == 4  # 32 // (2 ranks x 4)
        assert all(len(b) == 4 and b.bad == 0 for b in batches)
    assert f"train-000001.tar: declared 8 samples, read {held[1]}" in caplog.text
    assert "keeps the planned 4 batches" in caplog.text


def test_a_short_rank_refills_from_its_own_shards_and_resumes_exactly(tmp_path, caplog):
    root = wds(tmp_path / "wds", [8, 1, 8, 8], [8, 8, 8, 8], split="train", prefix="train")
    split = _train(root, num_workers=2, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="cratemae.data"):
        full = [b for b in split.loader(epoch=2).dataset if not hasattr(b, "message")]
    assert len(full) == split.batches_per_epoch == 8 and sum(b.bad for b in full) == 0
    short = str(root / "train-000001.tar")
    assert [m for b in full for m in b.miscounts] == [Miscount(short, 8, 1)]
    pixels = [b.images for b in full]
    tail = [b.images for b in split.loader(epoch=2, start_batch=5).dataset]
    assert len(tail) == 3 and all((a == b).all() for a, b in zip(tail, pixels[5:], strict=True))


def test_a_rank_whose_shard_ran_short_takes_the_same_steps_as_the_others(tmp_path):
    """The pure rule: a rank's batch count comes from the declared counts alone."""
    root = wds(tmp_path / "wds", [8, 1, 8, 8], [8, 8, 8, 8], split="train", prefix="train")
    source = resolve_source(str(root), "train")
    plans = [make_plan(source, split="train", batch_size=4, num_streams=2, training=True,
                       resampled=False, epoch_samples=None, seed=1, epoch=0, rank=r, world=2)
             for r in (0, 1)]
    assert [p.num_batches for p in plans] == [4, 4]
    loaders = [_train(root, r, 2, num_workers=2).loader(epoch=0) for r in (0, 1)]
    assert [sum(1 for _ in lo.dataset) for lo in loaders] == [4, 4]


@pytest.mark.slow  # two ranks that import torch and train: about 20 s on two busy cores
def test_two_ranks_train_in_step_when_one_ranks_shard_runs_short(tmp_path):
    """The quick counterparts: the two tests above, one rank at a time, in-process."""
    root = wds(tmp_path / "wds", [16, 3, 16, 16], [16] * 4, split="train", prefix="train")
    make_shards(tmp_path / "val", [8], prefix="val")
    out = tmp_path / "run"
    procs = launch(out, [*TINY_RUN, f'data.train="{root}"', f'data.val="{tmp_path / "val"}"',
                         "data.batch_size=8", "schedule.epochs=2"])
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    steps = [json.loads(x) for x in RunFiles(out).metrics.read_text().splitlines()]
    assert max(x.get("step", 0) for x in steps) == 8  # 2 epochs x 64 // (2 ranks x 8)
    assert "train-000001.tar: declared 16 samples, read 3" in "".join(errs)


def test_an_epoch_samples_that_known_counts_contradict_is_refused_not_ignored(tmp_path):
    """Known counts make a training epoch (each sample once); a data.epoch_samples other
    than their total was silently ignored. It is refused, naming both numbers and the way
    out; the same number, data.resampled, and evaluation (which reads everything) pass."""
    root = wds(tmp_path / "wds", [8, 8], [8, 8], split="train", prefix="train")
    source = resolve_source(str(root), "train")
    kw = dict(split="train", batch_size=2, num_streams=1, seed=0, epoch=0, rank=0, world=1)
    with pytest.raises(BadInputError, match=r"^data.epoch_samples = 6, but the counts of "
                       r"data.train's shards are known \(16 samples\) .* set data.resampled"):
        make_plan(source, training=True, resampled=False, epoch_samples=6, **kw)
    assert make_plan(source, training=True, resampled=False, epoch_samples=16,
                     **kw).num_batches == 8
    assert make_plan(source, training=True, resampled=True, epoch_samples=6,
                     **kw).num_batches == 3
    assert make_plan(source, training=False, resampled=False, epoch_samples=6,
                     **kw).num_batches == 8


def test_a_declared_empty_shard_is_read_by_one_stream_of_one_rank(tmp_path):
    root = wds(tmp_path / "wds", [8, 3, 8, 8, 8], [8, 0, 8, 8, 8], split="train",
               prefix="train")
    source = resolve_source(str(root), "train")
    checks = []
    for training in (True, False):
        for rank in (0, 1):
            plan = make_plan(source, split="train", batch_size=2, num_streams=2,
                             training=training, resampled=False, epoch_samples=None, seed=0,
                             epoch=0, rank=rank, world=2)
            checks += [seg for s in plan.streams for seg in s.segments if seg[0] == 1]
    assert checks == [(1, 0, 0), (1, 0, 0)]  # once in training, once in evaluation
    split = _train(root, 0, 1)
    loader = split.loader(epoch=0)
    assert len(list(loader)) == split.batches_per_epoch
    assert str(loader.miscounts[str(root / "train-000001.tar")]).endswith(
        "declared 0 samples, read 3")


def test_a_resume_past_every_batch_still_reads_and_refuses(tmp_path):
    """An interrupted evaluation rerun from its last batch must not pass for lack of reading:
    the skipped batches' shards are still checked (their counts arrive after the batches)."""
    data = data_section(None, val=str(wds(tmp_path / "wds", [6, 6], [6, 2])), num_workers=2)
    split = build_data(data, split="val", img_size=8, seed=0)
    for start in (split.batches_per_epoch - 1, split.batches_per_epoch):
        loader = split.loader(0, start_batch=start)
        assert len(list(loader)) == len(loader)
        assert "val-000001.tar: declared 2 samples, read 6" in str(loader.bad_fraction_error())


def test_embed_refuses_fifos_named_as_images_or_lists(ckpt, tmp_path):  # noqa: F811
    for name in ("x.png", "list.txt"):
        os.mkfifo(tmp_path / name)
    for arg in (tmp_path / "x.png", f"@{tmp_path / 'list.txt'}"):
        run = cli("embed", arg, "--checkpoint", ckpt, "--out", tmp_path / "f.safetensors")
        assert run.exit_code == 2 and "is a FIFO" in run.stderr, run.output
    (tmp_path / "names.txt").write_text("x.png\n")
    run = cli("embed", f"@{tmp_path / 'names.txt'}", "--checkpoint", ckpt, "--out",
              tmp_path / "f.safetensors")
    assert run.exit_code == 2 and "x.png, which is a FIFO" in run.stderr, run.output
